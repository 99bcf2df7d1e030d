"""DeepSeek-V3.2's indexer logits in Triton (prefill ranges and the paged decode cache).

A program owns ``BLOCK_N`` keys and a group of query rows that share them (a block of prefill rows,
or the ``next_n`` rows of one decode sequence): the keys are decoded once (e4m3fn bits to fp16,
exact, so AMD reads the OCP bytes as such), then for each row the scores of every head come from
one ``tl.dot`` (fp32 accumulation), are scaled by the key's fp32 scale, passed through relu,
weighted and summed over heads. Positions a row does not see are written -inf (always clean);
tiles no row of the group sees skip the dot products.

Semantics: :mod:`hal.ops.indexer_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import decode_e4m3fn, round_to
from hal.backends.triton.runtime import interpreting, launch_options
from hal.backends.triton.tuning import Tuning

__all__ = ["mqa_logits", "paged_mqa_logits"]

BLOCK_N = 64
BLOCK_M = 8  # prefill rows per program (they share the key tile)


@triton.jit
def _row_logits(q_row, w_row, keys, scales, num_heads, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """One query row against a decoded key tile: Σ_h relu((q_h · k) * sf) * w_h, fp32 [BLOCK_N]."""
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    d = tl.arange(0, D)
    q = decode_e4m3fn(tl.load(q_row + heads[:, None] * D + d[None, :], mask=head_ok[:, None], other=0)).to(tl.float16)
    w = tl.load(w_row + heads, mask=head_ok, other=0.0).to(tl.float32)
    raw = tl.dot(keys, tl.trans(q), out_dtype=tl.float32) * scales[:, None]  # [BLOCK_N, BLOCK_H]
    scores = tl.where(raw != raw, raw, tl.maximum(raw, 0.0))  # relu that keeps NaN, as torch's does
    return tl.sum(tl.where(head_ok[None, :], scores * w[None, :], 0.0), axis=1)


@triton.jit
def _mqa_logits_kernel(
    q_ptr, k_ptr, sf_ptr, w_ptr, start_ptr, end_ptr, out_ptr,
    seq_len, seq_len_kv, num_heads, width, stride_w, stride_o,
    COMPRESSED: tl.constexpr, EXACT_BF16: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = columns < width
    d = tl.arange(0, D)
    first = tl.program_id(0) * BLOCK_M
    keys = tl.zeros((BLOCK_N, D), dtype=tl.float16)
    scales = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if not COMPRESSED:  # the tile's keys are the same for every row: decode them once
        keys = decode_e4m3fn(tl.load(k_ptr + columns[:, None].to(tl.int64) * D + d[None, :], mask=column_ok[:, None], other=0)).to(tl.float16)
        scales = tl.load(sf_ptr + columns, mask=column_ok, other=0.0)
    for i in range(BLOCK_M):
        m = first + i
        if m < seq_len:
            start = tl.load(start_ptr + m)
            end = tl.load(end_ptr + m)
            key = columns
            if COMPRESSED:
                key = start + columns
            seen = column_ok & (key >= start) & (key < end)
            logits = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
            if tl.max(seen.to(tl.int32), axis=0) > 0:
                if COMPRESSED:
                    keys = decode_e4m3fn(tl.load(k_ptr + key[:, None].to(tl.int64) * D + d[None, :], mask=seen[:, None], other=0)).to(tl.float16)
                    scales = tl.load(sf_ptr + key, mask=seen, other=0.0)
                row = _row_logits(q_ptr + m.to(tl.int64) * num_heads * D, w_ptr + m.to(tl.int64) * stride_w, keys, scales, num_heads, D, BLOCK_H)
                logits = tl.where(seen, row, float("-inf"))
            tl.store(out_ptr + m.to(tl.int64) * stride_o + columns, round_to(logits, out_ptr.dtype.element_ty, EXACT_BF16), mask=column_ok)


@triton.jit
def _paged_mqa_logits_kernel(
    q_ptr, cache_u8, cache_f32, w_ptr, lens_ptr, table_ptr, out_ptr,
    next_n, num_heads, max_context_len, block_kv, stride_block, stride_table, stride_w, stride_o,
    LENS_2D: tl.constexpr, EXACT_BF16: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_width = positions < max_context_len
    # The longest visible length among this sequence's rows bounds the keys to load.
    if LENS_2D:
        longest = tl.load(lens_ptr + b * next_n + next_n - 1)
        for j in range(next_n):
            longest = tl.maximum(longest, tl.load(lens_ptr + b * next_n + j))
    else:
        longest = tl.load(lens_ptr + b)
    loaded = in_width & (positions < longest)
    any_loaded = tl.max(loaded.to(tl.int32), axis=0) > 0
    d = tl.arange(0, D)
    keys = tl.zeros((BLOCK_N, D), dtype=tl.float16)
    scales = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if any_loaded:
        block = tl.load(table_ptr + b.to(tl.int64) * stride_table + positions // block_kv, mask=loaded, other=0).to(tl.int64)
        slot = (positions % block_kv).to(tl.int64)
        base = block * stride_block  # bytes
        keys = decode_e4m3fn(tl.load(cache_u8 + base[:, None] + slot[:, None] * D + d[None, :], mask=loaded[:, None], other=0)).to(tl.float16)
        scales = tl.load(cache_f32 + (base + block_kv * D) // 4 + slot, mask=loaded, other=0.0)
    for j in range(next_n):
        row = b * next_n + j
        if LENS_2D:
            visible = tl.load(lens_ptr + row)
        else:
            visible = longest - next_n + 1 + j
        seen = in_width & (positions < visible)
        logits = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        if tl.max(seen.to(tl.int32), axis=0) > 0:
            values = _row_logits(q_ptr + row.to(tl.int64) * num_heads * D, w_ptr + row.to(tl.int64) * stride_w, keys, scales, num_heads, D, BLOCK_H)
            logits = tl.where(seen, values, float("-inf"))
        tl.store(out_ptr + row.to(tl.int64) * stride_o + positions, round_to(logits, out_ptr.dtype.element_ty, EXACT_BF16), mask=in_width)


def _block_h(num_heads: int) -> int:
    return max(16, triton.next_power_of_2(num_heads))  # tl.dot needs >= 16 along every dimension


def mqa_logits(
    q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, weights: torch.Tensor, k_start: torch.Tensor, k_end: torch.Tensor,
    clean_logits: bool, max_seqlen_k: int, logits_dtype: torch.dtype, *, tuning: Tuning,
) -> torch.Tensor:
    """Launch the prefill logits kernel (arguments validated by ``hal.ops.indexer``)."""
    seq_len, num_heads, head_dim = q.shape
    width = max_seqlen_k or k.shape[0]
    out = torch.empty(seq_len, width, dtype=logits_dtype, device=q.device)
    if out.numel() == 0:
        return out
    _mqa_logits_kernel[(triton.cdiv(seq_len, BLOCK_M), triton.cdiv(width, BLOCK_N))](
        q.view(torch.uint8), k.view(torch.uint8), k_scales, weights, k_start, k_end, out,
        seq_len, k.shape[0], num_heads, width, weights.stride(0), out.stride(0),
        COMPRESSED=max_seqlen_k > 0, EXACT_BF16=interpreting(), D=head_dim, BLOCK_H=_block_h(num_heads),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **launch_options(tuning),
    )
    return out


def paged_mqa_logits(
    q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
    max_context_len: int, clean_logits: bool, logits_dtype: torch.dtype, *, tuning: Tuning,
) -> torch.Tensor:
    """Launch the paged logits kernel (arguments validated by ``hal.ops.indexer``)."""
    batch, next_n, num_heads, head_dim = q.shape
    out = torch.empty(batch * next_n, max_context_len, dtype=logits_dtype, device=q.device)
    if out.numel() == 0:
        return out
    raw = kv_cache.view(torch.uint8)
    # The scales are read through a float32 view of the same bytes, from the cache's first byte.
    flat = torch.as_strided(raw, ((raw.untyped_storage().nbytes() - raw.storage_offset()) // 4 * 4,), (1,))
    _paged_mqa_logits_kernel[(batch, triton.cdiv(max_context_len, BLOCK_N))](
        q.view(torch.uint8), flat, flat.view(torch.float32), weights, context_lens, block_table, out,
        next_n, num_heads, max_context_len, kv_cache.shape[1], raw.stride(0), block_table.stride(0), weights.stride(0), out.stride(0),
        LENS_2D=context_lens.dim() == 2, EXACT_BF16=interpreting(), D=head_dim, BLOCK_H=_block_h(num_heads), BLOCK_N=BLOCK_N,
        **launch_options(tuning),
    )
    return out
