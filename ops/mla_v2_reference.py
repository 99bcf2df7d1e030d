"""Executable reference of FlashMLA's current decode (DeepSeek-V3.2): FP8 KV cache, sparse top-k
indices, a second ("extra") cache, attention sinks; and of its sparse prefill.

Per (query token, head) row, over the keys the row attends to (its causal window in the dense
mode; its valid indices, cut at ``topk_length``, plus the extra cache's, in the sparse mode):
``m = max(s)``, ``p = exp(s - m)`` (``m`` taken as 0 while it is -inf), ``l = sum(p)``,
``out = (p @ V) / l``, ``lse = m + log(l)`` (NaN and inf propagate as this math takes them, as in
:mod:`hal.ops.mla_reference`). A row with no key: out 0, lse +inf. With ``attn_sink``,
``out *= 1 / (1 + exp(sink[h] - lse))`` (lse unchanged; a +inf sink gives 0, -inf leaves out as
is). FP8 caches are dequantised exactly (:mod:`hal.ops.mla_fp8_cache`).
"""

from __future__ import annotations

import math

import torch

from hal.ops.mla_fp8_cache import MODEL1_DIM, dequantize_mla_kv_cache, dequantize_model1_kv_cache
from hal.ops.mla_reference import mla_decode_reference

__all__ = ["mla_decode_v2_reference", "mla_sparse_prefill_reference", "attend"]


def attend(queries: torch.Tensor, keys: torch.Tensor, scale: float, head_dim_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """queries [h, d], keys [n, d] (float32) -> out [h, head_dim_v], lse [h], max logit [h]; n may be 0."""
    if keys.shape[0] == 0:
        h = queries.shape[0]
        return queries.new_zeros(h, head_dim_v), queries.new_full((h,), math.inf), queries.new_full((h,), -math.inf)
    scores = (queries @ keys.T) * scale
    m = scores.amax(dim=-1)  # NaN-propagating
    p = torch.exp(scores - m.masked_fill(torch.isneginf(m), 0.0)[:, None])
    total = p.sum(dim=-1)
    return (p @ keys[:, :head_dim_v]) / total[:, None], m + torch.log(total), m


def _flat_keys(cache: torch.Tensor, fp8: bool, model1: bool = False) -> torch.Tensor:
    """[num_blocks, page, 1, d] -> float32 [num_blocks * page, d] (position = block * page + slot)."""
    keys = dequantize_model1_kv_cache(cache) if model1 else dequantize_mla_kv_cache(cache) if fp8 else cache.float()
    return keys.reshape(-1, keys.shape[-1])


def _selected(indices: torch.Tensor, length: torch.Tensor | None, b: int) -> torch.Tensor:
    """The valid positions of one row's index list, cut at ``length[b]``."""
    row = indices if length is None else indices[: int(length[b])]
    return row[row >= 0].long()


def _apply_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """out [..., h, dv], lse [..., h]: scale by 1 / (1 + exp(sink - lse)); rows without keys stay 0."""
    if sink is None:
        return out
    factor = 1.0 / (1.0 + torch.exp(sink.float() - lse))
    return torch.where(torch.isposinf(lse)[..., None], torch.zeros_like(out), out * factor[..., None])


def mla_decode_v2_reference(
    q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None, cache_seqlens: torch.Tensor | None, head_dim_v: int,
    softmax_scale: float, causal: bool, is_fp8_kvcache: bool, indices: torch.Tensor | None, attn_sink: torch.Tensor | None,
    extra_k_cache: torch.Tensor | None, extra_indices: torch.Tensor | None, topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`hal.flash_mla_with_kvcache` with the V3.2 arguments (already validated).

    Returns ``(out [b, s_q, h_q, head_dim_v] dtype of q, lse float32 [b, h_q, s_q])``.
    """
    if indices is None:  # dense, over the (dequantised) cache
        keys = dequantize_mla_kv_cache(k_cache) if is_fp8_kvcache else k_cache
        # q in fp32 (same values) keeps out unrounded until the sink is applied, then rounded once.
        out, lse = mla_decode_reference(q.float(), keys, block_table, cache_seqlens, head_dim_v, None, None, softmax_scale, causal)
        return _apply_sink(out, lse.permute(0, 2, 1), attn_sink).to(q.dtype), lse
    batch, s_q, h_q, d_qk = q.shape
    model1 = is_fp8_kvcache and d_qk == MODEL1_DIM  # FlashMLA's MODEL1_FP8Sparse: 512-wide keys, V the whole key
    keys = _flat_keys(k_cache, is_fp8_kvcache, model1)
    extra = _flat_keys(extra_k_cache, is_fp8_kvcache, model1) if extra_k_cache is not None else None
    out = torch.zeros(batch, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, s_q, h_q), math.inf, dtype=torch.float32, device=q.device)
    for b in range(batch):
        for t in range(s_q):
            chosen = keys[_selected(indices[b, t], topk_length, b)]
            if extra is not None:
                chosen = torch.cat([chosen, extra[_selected(extra_indices[b, t], extra_topk_length, b)]])
            out[b, t], lse[b, t], _ = attend(q[b, t].float(), chosen, softmax_scale, head_dim_v)
    out = _apply_sink(out, lse, attn_sink)
    return out.to(q.dtype), lse.permute(0, 2, 1).contiguous()


def mla_sparse_prefill_reference(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`hal.flash_mla_sparse_fwd` (already validated).

    q [s_q, h_q, d], kv [s_kv, h_kv, d], indices int32 [s_q, h_kv, topk] (negative or >= s_kv:
    unused), topk_length int32 [s_q]. Returns ``(out bf16 [s_q, h_q, d_v], max_logits float32
    [s_q, h_q], lse float32 [s_q, h_q])``; a row with no key: out 0, max_logits -inf, lse +inf.
    """
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    group = h_q // h_kv
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((s_q, h_q), math.inf, dtype=torch.float32, device=q.device)
    max_logits = torch.full((s_q, h_q), -math.inf, dtype=torch.float32, device=q.device)
    for t in range(s_q):
        for g in range(h_kv):
            row = indices[t, g] if topk_length is None else indices[t, g, : int(topk_length[t])]
            row = row[(row >= 0) & (row < s_kv)].long()
            heads = slice(g * group, (g + 1) * group)
            out[t, heads], lse[t, heads], max_logits[t, heads] = attend(q[t, heads].float(), kv[row, g].float(), sm_scale, d_v)
    return _apply_sink(out, lse, attn_sink).to(torch.bfloat16), max_logits, lse
