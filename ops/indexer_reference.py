"""Executable reference of the indexer logits (:mod:`hal.ops.indexer`), in float32 as the kernels.

``logit[row, key] = Σ_h relu((q[row, h] · k[key]) * sf[key]) * w[row, h]``: the e4m3 products are
exact in fp32 and accumulate in fp32; the sum over heads is fp32; bf16 logits are that sum rounded
once. Work is chunked so the [rows, heads, keys] score block stays under ~64 MiB.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mqa_logits_reference", "paged_mqa_logits_reference", "split_paged_cache", "visible_lengths"]

_CHUNK_BYTES = 64 << 20


def _logits_scaled(q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q float32 [m, H, D], k float32 [n, D], k_scales [n], weights float32 [m, H] -> float32 [m, n].

    The scale multiplies the dot product (as the kernels do), never the keys."""
    rows = max(1, _CHUNK_BYTES // max(1, q.shape[1] * k.shape[0] * 4))
    out = q.new_empty(q.shape[0], k.shape[0])
    for start in range(0, q.shape[0], rows):
        scores = torch.einsum("mhd,nd->mhn", q[start : start + rows], k) * k_scales[None, None, :]
        out[start : start + rows] = torch.einsum("mhn,mh->mn", scores.relu(), weights[start : start + rows])
    return out


def mqa_logits_reference(
    q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, weights: torch.Tensor, k_start: torch.Tensor, k_end: torch.Tensor,
    clean_logits: bool, max_seqlen_k: int, logits_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of ``fp8_mqa_logits`` (validated arguments); -inf wherever a row sees no key."""
    seq_len, seq_len_kv = q.shape[0], k.shape[0]
    full = _logits_scaled(q.float(), k.float(), k_scales, weights.float())
    keys = torch.arange(seq_len_kv, device=q.device)
    start, end = k_start.long()[:, None], k_end.long()[:, None]
    full = full.masked_fill(~((keys[None, :] >= start) & (keys[None, :] < end)), -math.inf)
    if max_seqlen_k:
        column = start + torch.arange(max_seqlen_k, device=q.device)[None, :]
        inside = column < end
        if seq_len_kv:
            full = torch.where(inside, full.gather(1, column.clamp(max=seq_len_kv - 1)), -math.inf)
        else:
            full = q.new_full((seq_len, max_seqlen_k), -math.inf, dtype=torch.float32)
    return full.to(logits_dtype)


def split_paged_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [num_blocks, block_kv, 1, D + 4] -> ``(e4m3 [num_blocks, block_kv, D], float32 [num_blocks, block_kv])``."""
    num_blocks, block_kv, _, width = kv_cache.shape
    head_dim = width - 4
    raw = kv_cache.flatten(1)  # each block is contiguous (checked); blocks may be strided
    values = raw[:, : block_kv * head_dim].contiguous().view(torch.float8_e4m3fn).view(num_blocks, block_kv, head_dim)
    scales = raw[:, block_kv * head_dim :].contiguous().view(torch.float32).view(num_blocks, block_kv)
    return values, scales


def visible_lengths(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """int64 [batch, next_n]: row (b, j) sees positions ``p < result[b, j]``."""
    if context_lens.dim() == 2:
        return context_lens.long()
    offsets = torch.arange(next_n, device=context_lens.device)
    return (context_lens.long()[:, None] - next_n + 1 + offsets[None, :]).clamp(min=0)


def paged_mqa_logits_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
    max_context_len: int, clean_logits: bool, logits_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of ``fp8_paged_mqa_logits`` (validated arguments); -inf wherever a row sees no key."""
    batch, next_n, num_heads, head_dim = q.shape
    values, scales = split_paged_cache(kv_cache)
    block_kv = values.shape[1]
    lengths = visible_lengths(context_lens, next_n)  # [batch, next_n]
    out = torch.full((batch * next_n, max_context_len), -math.inf, dtype=torch.float32, device=q.device)
    w = weights.float().view(batch, next_n, num_heads)
    for b in range(batch):
        longest = int(lengths[b].max()) if next_n else 0
        pages = -(-longest // block_kv) if block_kv else 0
        if longest == 0:
            continue
        blocks = block_table[b, :pages].long()
        keys = values[blocks].reshape(-1, head_dim)[:longest].float()
        key_scales = scales[blocks].reshape(-1)[:longest]
        logits = _logits_scaled(q[b].float(), keys, key_scales, w[b])  # [next_n, longest]
        seen = torch.arange(longest, device=q.device)[None, :] < lengths[b][:, None]
        out[b * next_n : (b + 1) * next_n, :longest] = logits.masked_fill(~seen, -math.inf)
    return out.to(logits_dtype)
