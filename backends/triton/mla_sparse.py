"""MLA decode over top-k indices (FlashMLA's DeepSeek-V3.2 sparse mode) in Triton.

One program per (batch, query token, block of heads): it walks the token's index list in chunks
of ``BLOCK_N`` keys, gathers each key from the flattened cache (``block * page + slot``), and
runs the online softmax of :mod:`hal.backends.triton.mla_decode` (NaN-propagating running max,
emptiness by the count of valid keys, never by the sum), then the extra cache's list into the
same softmax, then the attention sink. Keys are read from the 656-byte FP8 layout (e4m3fn latent
decoded bit-exactly, times its tile's power-of-two scale; bf16 rope) or from a bf16/fp16 cache.

Semantics: :func:`hal.ops.mla_v2_reference.mla_decode_v2_reference` (sparse mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import decode_e4m3fn, encode_e4m3fn, round_to
from hal.backends.triton.runtime import interpreting, launch_options
from hal.backends.triton.softmax import online_softmax_update
from hal.backends.triton.tuning import Tuning

__all__ = ["mla_decode_sparse", "mla_sparse_prefill", "quantize_mla_kv_cache"]

D_NOPE = 512
D_ROPE = 64
TOKEN_BYTES = 656
LOG2E = 1.4426950408889634


@triton.jit
def _load_keys(cache_u8, cache_f32, cache_b16, cache_k, position, valid, page, stride_block, stride_slot, d_nope, d_rope, FP8: tl.constexpr,
               HAS_ROPE: tl.constexpr):
    """Keys [BLOCK_N, 512] and [BLOCK_N, 64] (fp32) at flattened positions; invalid rows are 0, never
    read. Without ``HAS_ROPE`` (512-wide keys) the second part is 0 and nothing of it is read."""
    block = (position // page).to(tl.int64)
    slot = (position % page).to(tl.int64)
    base = block * stride_block + slot * stride_slot  # in elements of the cache's own view
    if FP8:
        codes = tl.load(cache_u8 + base[:, None] + d_nope[None, :], mask=valid[:, None], other=0)
        scales = tl.load(cache_f32 + (base[:, None] + D_NOPE) // 4 + d_nope[None, :] // 128, mask=valid[:, None], other=0.0)
        nope = tl.where(valid[:, None], decode_e4m3fn(codes) * scales, 0.0)
        rope = tl.load(cache_b16 + (base[:, None] + D_NOPE + 16) // 2 + d_rope[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    else:
        nope = tl.load(cache_k + base[:, None] + d_nope[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        rope = tl.load(cache_k + base[:, None] + D_NOPE + d_rope[None, :], mask=valid[:, None] & HAS_ROPE, other=0.0).to(tl.float32)
    return nope, rope


@triton.jit
def _attend_list(
    q_nope, q_rope, m_i, l_i, acc, count,
    idx_ptr, length, topk, limit, cache_u8, cache_f32, cache_b16, cache_k, page, stride_block, stride_slot, scale_log2,
    FP8: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr = True,
):
    """Fold one index list (``length`` of its ``topk`` entries; positions in [0, limit) count) into the
    running softmax state."""
    d_nope = tl.arange(0, D_NOPE)
    d_rope = tl.arange(0, D_ROPE)
    for start in range(0, topk, BLOCK_N):
        offsets = start + tl.arange(0, BLOCK_N)
        in_list = offsets < length
        position = tl.load(idx_ptr + offsets, mask=in_list, other=-1)
        valid = in_list & (position >= 0) & (position < limit)
        k_nope, k_rope = _load_keys(cache_u8, cache_f32, cache_b16, cache_k, tl.maximum(position, 0), valid, page, stride_block, stride_slot, d_nope, d_rope, FP8,
                                    HAS_ROPE)
        scores = tl.dot(q_nope, tl.trans(k_nope), input_precision="ieee")
        if HAS_ROPE:
            scores += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, scores, k_nope)
        count += tl.sum(valid.to(tl.int32), axis=0)
    return m_i, l_i, acc, count


@triton.jit
def _start_rows(q_row, head_ok, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr = True):
    """A block of query rows (fp32 nope and rope parts; rope 0 for 512-wide rows) and an empty softmax state."""
    d_nope = tl.arange(0, D_NOPE)
    d_rope = tl.arange(0, D_ROPE)
    q_nope = tl.load(q_row[:, None] + d_nope[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
    q_rope = tl.load(q_row[:, None] + D_NOPE + d_rope[None, :], mask=head_ok[:, None] & HAS_ROPE, other=0.0).to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, D_NOPE), dtype=tl.float32)
    count = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.int32), axis=0)
    return q_nope, q_rope, m_i, l_i, acc, count


@triton.jit
def _finish_rows(acc, l_i, m_i, count, sink_ptr, heads, head_ok, HAS_SINK: tl.constexpr):
    """(out, natural-log lse); the sink scales out; rows that saw no valid key: out 0, lse +inf (by count, never by l)."""
    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
        o = o * (1.0 / (1.0 + tl.exp(sink - lse)))[:, None]
    seen = count > 0
    return tl.where(seen, o, 0.0), tl.where(seen, lse, float("inf"))


@triton.jit
def _mla_sparse_kernel(
    q_ptr, out_ptr, lse_ptr, sink_ptr,
    idx_ptr, len_ptr, cache_u8, cache_f32, cache_b16, cache_k, page, stride_block, stride_slot, topk,
    x_idx_ptr, x_len_ptr, x_u8, x_f32, x_b16, x_k, x_page, x_stride_block, x_stride_slot, x_topk,
    s_q, h_q, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    FP8: tl.constexpr, HAS_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_X_LEN: tl.constexpr, HAS_SINK: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)  # b * s_q + t
    b = row // s_q
    t = row % s_q
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < h_q
    d_nope = tl.arange(0, D_NOPE)
    q_row = q_ptr + b * stride_qb + t * stride_qs + heads * stride_qh
    q_nope, q_rope, m_i, l_i, acc, count = _start_rows(q_row, head_ok, BLOCK_H, BLOCK_N)
    length = topk
    if HAS_LEN:
        length = tl.load(len_ptr + b)
    m_i, l_i, acc, count = _attend_list(
        q_nope, q_rope, m_i, l_i, acc, count, idx_ptr + row * topk, length, topk, 2147483647,
        cache_u8, cache_f32, cache_b16, cache_k, page, stride_block, stride_slot, scale_log2, FP8, BLOCK_N,
    )
    if HAS_EXTRA:
        x_length = x_topk
        if HAS_X_LEN:
            x_length = tl.load(x_len_ptr + b)
        m_i, l_i, acc, count = _attend_list(
            q_nope, q_rope, m_i, l_i, acc, count, x_idx_ptr + row * x_topk, x_length, x_topk, 2147483647,
            x_u8, x_f32, x_b16, x_k, x_page, x_stride_block, x_stride_slot, scale_log2, FP8, BLOCK_N,
        )
    o, lse = _finish_rows(acc, l_i, m_i, count, sink_ptr, heads, head_ok, HAS_SINK)
    out_row = out_ptr + b * stride_ob + t * stride_os + heads * stride_oh
    tl.store(out_row[:, None] + d_nope[None, :], round_to(o, out_ptr.dtype.element_ty, EXACT_BF16), mask=head_ok[:, None])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + t, lse, mask=head_ok)


@triton.jit
def _mla_sparse_prefill_kernel(
    q_ptr, kv_ptr, idx_ptr, len_ptr, sink_ptr, out_ptr, max_ptr, lse_ptr,
    s_kv, h_q, group, topk, scale_log2,
    stride_qs, stride_qh, stride_kvs, stride_kvh, stride_is, stride_ih, stride_os, stride_oh, stride_ms, stride_ls,
    HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr, EXACT_BF16: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)  # KV head: its query heads g * group .. (g + 1) * group - 1
    local = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = local < group
    heads = g * group + local
    d_nope = tl.arange(0, D_NOPE)
    q_row = q_ptr + t * stride_qs + heads * stride_qh
    q_nope, q_rope, m_i, l_i, acc, count = _start_rows(q_row, head_ok, BLOCK_H, BLOCK_N, HAS_ROPE)
    length = topk
    if HAS_LEN:
        length = tl.load(len_ptr + t)
    kv_head = kv_ptr + g * stride_kvh  # keys of this KV head: position p at p * stride_kvs (a "page" of one token)
    m_i, l_i, acc, count = _attend_list(
        q_nope, q_rope, m_i, l_i, acc, count, idx_ptr + t * stride_is + g * stride_ih, length, topk, s_kv,
        kv_head, kv_head, kv_head, kv_head, 1, stride_kvs, 0, scale_log2, False, BLOCK_N, HAS_ROPE,
    )
    o, lse = _finish_rows(acc, l_i, m_i, count, sink_ptr, heads, head_ok, HAS_SINK)
    tl.store(out_ptr + t * stride_os + heads[:, None] * stride_oh + d_nope[None, :], round_to(o, out_ptr.dtype.element_ty, EXACT_BF16), mask=head_ok[:, None])
    tl.store(max_ptr + t * stride_ms + heads, tl.where(count > 0, m_i * 0.6931471805599453, float("-inf")), mask=head_ok)
    tl.store(lse_ptr + t * stride_ls + heads, lse, mask=head_ok)


def mla_sparse_prefill(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None, *, tuning: Tuning,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the sparse prefill kernel (arguments validated by ``hal.ops.mla_v2``)."""
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    group = h_q // h_kv
    out = torch.empty(s_q, h_q, d_v, dtype=torch.bfloat16, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, max_logits, lse
    block_h = tuning.mla.block_h
    _mla_sparse_prefill_kernel[(s_q, h_kv, triton.cdiv(group, block_h))](
        q, kv, indices, topk_length if topk_length is not None else indices, attn_sink if attn_sink is not None else lse, out, max_logits, lse,
        s_kv, h_q, group, indices.shape[2], sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1), out.stride(0), out.stride(1),
        max_logits.stride(0), lse.stride(0),
        HAS_LEN=topk_length is not None, HAS_SINK=attn_sink is not None, EXACT_BF16=interpreting(),
        BLOCK_H=block_h, BLOCK_N=16, HAS_ROPE=q.shape[-1] > D_NOPE, num_warps=tuning.mla.num_warps, **launch_options(tuning),
    )
    return out, max_logits, lse


def _cache_views(cache: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """(uint8, float32, bf16, element) views of one cache's storage, page size and strides in elements."""
    if fp8:
        raw = cache.view(torch.uint8)
        # Scales and rope are read through float32 / bf16 views of the same bytes: the cache's
        # storage from its first byte, long enough for the last token.
        flat = torch.as_strided(raw, (raw.untyped_storage().nbytes() - raw.storage_offset(),), (1,))
        usable = flat.numel() // 4 * 4
        return flat, flat[:usable].view(torch.float32), flat[: flat.numel() // 2 * 2].view(torch.bfloat16), flat, cache.shape[1], raw.stride(0), raw.stride(1)
    return cache, cache, cache, cache, cache.shape[1], cache.stride(0), cache.stride(1)


def mla_decode_sparse(
    q: torch.Tensor, k_cache: torch.Tensor, softmax_scale: float, is_fp8_kvcache: bool, indices: torch.Tensor,
    attn_sink: torch.Tensor | None, extra_k_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
    topk_length: torch.Tensor | None, extra_topk_length: torch.Tensor | None, *, tuning: Tuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the sparse kernel (arguments validated by ``hal.ops.mla_v2``; h_kv = 1)."""
    batch, s_q, h_q, _ = q.shape
    out = torch.empty(batch, s_q, h_q, D_NOPE, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    indices = indices.contiguous()
    main = _cache_views(k_cache, is_fp8_kvcache)
    extra = _cache_views(extra_k_cache, is_fp8_kvcache) if extra_k_cache is not None else main
    x_indices = extra_indices.contiguous() if extra_indices is not None else indices
    block_h = tuning.mla.block_h
    block_n = 16
    _mla_sparse_kernel[(batch * s_q, triton.cdiv(h_q, block_h))](
        q, out, lse, attn_sink if attn_sink is not None else lse,
        indices, topk_length if topk_length is not None else indices, *main[:4], *main[4:], indices.shape[2],
        x_indices, extra_topk_length if extra_topk_length is not None else x_indices, *extra[:4], *extra[4:], x_indices.shape[2],
        s_q, h_q, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        FP8=is_fp8_kvcache, HAS_LEN=topk_length is not None, HAS_EXTRA=extra_k_cache is not None,
        HAS_X_LEN=extra_topk_length is not None, HAS_SINK=attn_sink is not None,
        EXACT_BF16=interpreting(), BLOCK_H=block_h, BLOCK_N=block_n, num_warps=tuning.mla.num_warps, **launch_options(tuning),
    )
    return out, lse


@triton.jit
def _quantize_kernel(
    x_ptr, out_u8, out_f32, out_b16, stride_block, stride_slot, page,
    EXACT_BF16: tl.constexpr, TILES: tl.constexpr, TILE: tl.constexpr,
):
    """One token: 4 tiles of 128 latent values -> e4m3 codes and power-of-two scales; rope -> bf16."""
    token = tl.program_id(0)
    block = token // page
    slot = token % page
    src = x_ptr + block.to(tl.int64) * stride_block + slot.to(tl.int64) * stride_slot
    tiles = tl.arange(0, TILES)
    lanes = tl.arange(0, TILE)
    latent = tl.load(src + tiles[:, None] * TILE + lanes[None, :]).to(tl.float32)  # [TILES, TILE]
    amax = tl.max(tl.abs(latent), axis=1)
    has_nan = tl.max((latent != latent).to(tl.int32), axis=1) != 0
    x = tl.math.div_rn(tl.where(has_nan, float("nan"), amax), 448.0)
    x = tl.where(x != x, x, tl.maximum(x, 1e-4))
    bits = x.to(tl.int32, bitcast=True)
    exponent = bits & 0x7F800000
    up = tl.where((bits & 0x7FFFFF) == 0, exponent, exponent + (1 << 23)).to(tl.float32, bitcast=True)
    scale = tl.where(exponent == 0x7F800000, x, up)  # NaN and inf stay as they are
    codes = encode_e4m3fn(tl.math.div_rn(latent, scale[:, None]))
    dst = token.to(tl.int64) * TOKEN_BYTES
    tl.store(out_u8 + dst + tiles[:, None] * TILE + lanes[None, :], codes)
    tl.store(out_f32 + (dst + D_NOPE) // 4 + tiles, scale)
    rope = tl.arange(0, D_ROPE)
    values = tl.load(src + D_NOPE + rope).to(tl.float32)
    tl.store(out_b16 + (dst + D_NOPE + 16) // 2 + rope, round_to(values, tl.bfloat16, EXACT_BF16))


def quantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """Launch the FP8 cache quantiser (argument validated by ``hal.ops.mla_fp8_cache``)."""
    blocks, page = k_cache.shape[:2]
    out = torch.empty(blocks, page, TOKEN_BYTES, dtype=torch.uint8, device=k_cache.device)
    if out.numel() == 0:
        return out.view(torch.float8_e4m3fn).view(blocks, page, 1, TOKEN_BYTES)
    x = k_cache if k_cache.stride(3) == 1 else k_cache.contiguous()
    flat = out.view(-1)
    _quantize_kernel[(blocks * page,)](
        x, flat, flat.view(torch.float32), flat.view(torch.bfloat16), x.stride(0), x.stride(1), page,
        EXACT_BF16=interpreting(), TILES=4, TILE=128,
    )
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, TOKEN_BYTES)
