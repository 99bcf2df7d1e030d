"""The numpy backend for unihal: every operator computed with numpy on the CPU.

Made with ``hal new-backend numpy`` and filled in: it is the worked example of the vendor path
(an out-of-tree package, discovered through its entry point, selected by HAL_BACKEND=numpy,
certified by ``hal conformance``). numpy has no bf16/fp16-as-storage or fp8 types, so torch
converts dtypes at the boundary; every arithmetic step runs in numpy float32.
"""

from __future__ import annotations

import numpy as np
import torch

from hal.plugin import Availability, BackendInfo, hookimpl

BACKEND = "numpy"
BLOCK = 128
PAGE = 64
FP8_MAX = np.float32(448.0)


def _f32(t: torch.Tensor) -> np.ndarray:
    """Any float tensor (bf16, fp16, fp8 included) as a float32 numpy array."""
    return t.detach().float().numpy()


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(description="numpy on the CPU (out-of-tree example made with hal new-backend)", priority=10, device_types=("cpu",))


@hookimpl
def hal_backend_availability() -> Availability:
    return Availability(True, device=f"numpy {np.__version__} on the CPU")


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    """Multi-head latent attention decode over a paged KV cache: operator ``mla_decode``, contract in hal.hookspecs.hal_mla_decode."""
    batch, s_q, h_q, dim = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    queries, cache, table = _f32(q), _f32(k_cache), block_table.numpy()
    out = np.zeros((batch, s_q, h_q, head_dim_v), dtype=np.float32)
    lse = np.full((batch, h_q, s_q), np.inf, dtype=np.float32)
    for b, seqlen in enumerate(cache_seqlens.tolist()):
        if seqlen == 0:
            continue
        pages = table[b, : -(-seqlen // PAGE)]
        keys = cache[pages].reshape(-1, h_kv, dim)[:seqlen]  # [n, h_kv, d]
        visible = np.clip(np.arange(seqlen - s_q + 1, seqlen + 1), 0, seqlen) if causal else np.full(s_q, seqlen)
        blind = visible == 0  # rows that see no key: out 0, lse +inf
        for h in range(h_q):
            k = keys[:, h // group]  # [n, d]
            scores = (queries[b, :, h] @ k.T) * np.float32(softmax_scale)  # [s_q, n]
            scores = np.where(np.arange(seqlen)[None, :] < visible[:, None], scores, -np.inf)
            peak = scores.max(axis=1, keepdims=True)  # NaN-propagating
            weights = np.exp(scores - np.where(np.isneginf(peak), np.float32(0), peak))
            total = weights.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):  # NaN and inf go where the math takes them
                rows = (weights @ k[:, :head_dim_v]) / total
                row_lse = (peak + np.log(total))[:, 0]
            out[b, :, h] = np.where(blind[:, None], np.float32(0), rows)
            lse[b, h] = np.where(blind, np.float32(np.inf), row_lse)
    return torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse)


def _blockwise(a: np.ndarray, sa: np.ndarray, b: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """sum over K blocks of (a_blk @ b_blk.T) * sa[:, kb] * sb[n // 128, kb], in float32."""
    n = b.shape[0]
    b_row_scales = np.repeat(sb, BLOCK, axis=0)[:n]
    acc = np.zeros((a.shape[0], n), dtype=np.float32)
    for kb in range(a.shape[1] // BLOCK):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        acc += (a[:, cols] @ b[:, cols].T) * sa[:, kb : kb + 1] * b_row_scales[None, :, kb]
    return acc


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    """``out = (a * a_scales) @ (b * b_scales).T`` with fp32 accumulation, written in place: operator ``gemm_fp8_nt``, contract in hal.hookspecs.hal_gemm_fp8_nt."""
    out.copy_(torch.from_numpy(_blockwise(_f32(a), a_scales.numpy(), _f32(b), b_scales.numpy())))


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    """MoE grouped GEMM, rows of ``a`` grouped contiguously by expert: operator ``m_grouped_gemm_fp8_nt_contiguous``, contract in hal.hookspecs.hal_m_grouped_gemm_fp8_nt_contiguous."""
    lhs, lhs_scales, groups = _f32(a), a_scales.numpy(), m_indices.numpy()
    for g in np.unique(groups[groups >= 0]):
        rows = np.nonzero(groups == g)[0]
        out[torch.from_numpy(rows)] = torch.from_numpy(_blockwise(lhs[rows], lhs_scales[rows], _f32(b[g]), b_scales[g].numpy())).to(out.dtype)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    """MoE grouped GEMM with a per-group row count (decode layout): operator ``m_grouped_gemm_fp8_nt_masked``, contract in hal.hookspecs.hal_m_grouped_gemm_fp8_nt_masked."""
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            product = _blockwise(_f32(a[g, :rows]), a_scales[g, :rows].numpy(), _f32(b[g]), b_scales[g].numpy())
            out[g, :rows] = torch.from_numpy(product).to(out.dtype)


def _quantise(view: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Scaled values and amax / 448 over ``axes``; the factor is (1 / amax) * 448 as torch evaluates 448 / amax."""
    amax = np.maximum(np.abs(view).max(axis=axes, keepdims=True), np.float32(1e-4))
    return view * ((np.float32(1.0) / amax) * FP8_MAX), amax / FP8_MAX


@hookimpl
def hal_per_token_cast_to_fp8(x):
    """Quantise activations: x [M, K] (K % 128 == 0) -> (float8_e4m3fn [M, K], float32 [M, K // 128]): operator ``per_token_cast_to_fp8``, contract in hal.hookspecs.hal_per_token_cast_to_fp8."""
    m, k = x.shape
    scaled, scales = _quantise(_f32(x).reshape(m, k // BLOCK, BLOCK), (2,))
    return torch.from_numpy(scaled.reshape(m, k)).to(torch.float8_e4m3fn), torch.from_numpy(scales.reshape(m, k // BLOCK))


@hookimpl
def hal_per_block_cast_to_fp8(x):
    """Quantise weights: x [N, K] -> (float8_e4m3fn [N, K], float32 [ceil(N/128), ceil(K/128)]): operator ``per_block_cast_to_fp8``, contract in hal.hookspecs.hal_per_block_cast_to_fp8."""
    n, k = x.shape
    rows, cols = -(-n // BLOCK), -(-k // BLOCK)
    padded = np.zeros((rows * BLOCK, cols * BLOCK), dtype=np.float32)
    padded[:n, :k] = _f32(x)
    scaled, scales = _quantise(padded.reshape(rows, BLOCK, cols, BLOCK), (1, 3))
    values = np.ascontiguousarray(scaled.reshape(rows * BLOCK, cols * BLOCK)[:n, :k])
    return torch.from_numpy(values).to(torch.float8_e4m3fn), torch.from_numpy(scales.reshape(rows, cols))


@hookimpl
def hal_ep_dispatch_layout(topk_idx, num_experts, num_ranks):
    """Where each token goes: see :func:`hal.ops.ep.get_dispatch_layout` for the full contract: operator ``ep_dispatch_layout``, contract in hal.hookspecs.hal_ep_dispatch_layout."""
    topk = topk_idx.numpy()
    chosen = topk >= 0
    per_expert = np.bincount(topk[chosen], minlength=num_experts).astype(np.int32)
    ranks = np.where(chosen, topk // (num_experts // num_ranks), -1)
    in_rank = (ranks[:, :, None] == np.arange(num_ranks)[None, None, :]).any(axis=1)
    per_rank = in_rank.sum(axis=0).astype(np.int32)
    per_node = None
    if num_ranks > 8:
        per_node = torch.from_numpy(in_rank.reshape(len(topk), num_ranks // 8, 8).any(axis=2).sum(axis=0).astype(np.int32))
    return torch.from_numpy(per_rank), per_node, torch.from_numpy(per_expert), torch.from_numpy(in_rank)


# numpy has no bf16 or fp8: rows that are only moved travel as integers of the same width.
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(_RAW[t.element_size()]).numpy()


def _from_raw(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).view(dtype)


@hookimpl
def hal_ep_pack(rows, bucket_idx, num_buckets):
    """Copy rows into bucket-major order: operator ``ep_pack``, contract in hal.hookspecs.hal_ep_pack."""
    buckets = bucket_idx.numpy()
    token, slot = np.nonzero(buckets >= 0)  # row-major: tokens ascending, then slots
    bucket = buckets[token, slot]
    src = token[np.argsort(bucket, kind="stable")]
    counts = np.bincount(bucket, minlength=num_buckets).astype(np.int32)
    return _from_raw(_raw(rows)[src], rows.dtype), torch.from_numpy(src.astype(np.int32)), torch.from_numpy(counts)


@hookimpl
def hal_ep_unpack(rows, bucket_of_row, num_buckets, num_slots):
    """Regroup rows into fixed slots per bucket: operator ``ep_unpack``, contract in hal.hookspecs.hal_ep_unpack."""
    bucket = bucket_of_row.numpy().astype(np.int64)
    raw = _raw(rows)
    slots = np.zeros((num_buckets * num_slots,) + raw.shape[1:], dtype=raw.dtype)
    filled = np.zeros(num_buckets, dtype=np.int64)
    for row, b in enumerate(bucket):
        slots[b * num_slots + filled[b]] = raw[row]
        filled[b] += 1
    return _from_raw(slots, rows.dtype).view((num_buckets, num_slots) + tuple(rows.shape[1:])), torch.from_numpy(filled.astype(np.int32))


@hookimpl
def hal_ep_combine_reduce(rows, src_idx, num_tokens, weights):
    """Sum rows into their tokens: operator ``ep_combine_reduce``, contract in hal.hookspecs.hal_ep_combine_reduce."""
    values = _f32(rows)
    if weights is not None:
        values = values * weights.numpy()[:, None]
    out = np.zeros((num_tokens, rows.shape[1]), dtype=np.float32)
    np.add.at(out, src_idx.numpy(), values)
    return torch.from_numpy(out).to(rows.dtype)
