"""MLA decode over a paged KV cache: FlashMLA's split-KV schedule, executed in Triton.

Kernel 1 runs one program per (SM part, block of query rows, KV head). Its row of
``tile_scheduler_metadata`` (``[begin_batch, begin_token, end_batch, end_token, begin_split]``)
lists the sequences and KV pages it owns. For each owned sequence it computes attention over its
pages with an online softmax in the log2 domain; a sequence the part covers entirely is written
straight to ``out``/``lse``, a partial one to an fp32 accumulator slot ``num_splits[b] + split``.
Kernel 2 merges the partial slots of each split sequence with log-sum-exp weights. Because both
kernels read the schedule from device memory, a decode step is CUDA-graph capturable, and any
schedule that follows ``get_mla_metadata``'s contract gives the same result.

Query rows of one KV head are ``r = i * group + j`` (token i of s_q, head ``kv_head * group + j``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import round_to
from hal.backends.triton.runtime import dot_operand_dtype, interpreting, launch_options
from hal.backends.triton.softmax import online_softmax_update
from hal.backends.triton.tuning import Tuning

__all__ = ["mla_decode"]

PAGE = 64
D_NOPE = 512
D_ROPE = 64
LOG2E = 1.4426950408889634


@triton.jit
def _mla_split_kernel(
    q_ptr, k_ptr, table_ptr, seqlens_ptr, meta_ptr, splits_ptr,
    out_ptr, lse_ptr, acc_o_ptr, acc_lse_ptr,
    batch, s_q, group, scale_log2,
    stride_qb, stride_qs, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_tb,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_ai, stride_ar, stride_li,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr, PAGE: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
):
    # Row blocks on the fastest grid axis: the programs that read one part's KV pages (one per
    # block of BLOCK_H query rows) are launched together, so the pages come from HBM once and from
    # L2 for the others (with the part first, h_q = 128 ran its 8 row blocks in separate waves).
    row_block = tl.program_id(0)
    part = tl.program_id(1)
    kv_head = tl.program_id(2)
    begin_b = tl.load(meta_ptr + part * 8 + 0)
    begin_t = tl.load(meta_ptr + part * 8 + 1)
    end_b = tl.load(meta_ptr + part * 8 + 2)
    end_t = tl.load(meta_ptr + part * 8 + 3)
    begin_split = tl.load(meta_ptr + part * 8 + 4)
    if begin_b >= batch:
        return
    rows = row_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < s_q * group
    token = rows // group
    head = kv_head * group + rows % group
    d_nope = tl.arange(0, D_NOPE)
    d_rope = tl.arange(0, D_ROPE)
    slots = tl.arange(0, PAGE)
    for b in range(begin_b, end_b + 1):
        seqlen = tl.load(seqlens_ptr + b)
        num_pages = tl.cdiv(seqlen, PAGE)
        first = tl.where(b == begin_b, begin_t // PAGE, 0)
        last = tl.where(b == end_b, tl.cdiv(end_t, PAGE), num_pages)
        split = tl.where(b == begin_b, begin_split, 0)
        q_row = q_ptr + b * stride_qb + token * stride_qs + head * stride_qh
        q_nope = tl.load(q_row[:, None] + d_nope[None, :], mask=row_ok[:, None], other=0.0)
        q_rope = tl.load(q_row[:, None] + D_NOPE + d_rope[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q_nope = q_nope.to(tl.float32)
            q_rope = q_rope.to(tl.float32)
        if CAUSAL:
            visible = seqlen - s_q + token + 1
        else:
            visible = tl.zeros((BLOCK_H,), dtype=tl.int32) + seqlen
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, D_NOPE), dtype=tl.float32)
        for page_index in range(first, last):
            page = tl.load(table_ptr + b * stride_tb + page_index).to(tl.int64)
            keys = page_index * PAGE + slots
            key_ok = keys < seqlen
            k_row = k_ptr + page * stride_kp + slots * stride_ks + kv_head * stride_kh
            k_nope = tl.load(k_row[:, None] + d_nope[None, :], mask=key_ok[:, None], other=0.0)
            k_rope = tl.load(k_row[:, None] + D_NOPE + d_rope[None, :], mask=key_ok[:, None], other=0.0)
            if UPCAST:
                k_nope = k_nope.to(tl.float32)
                k_rope = k_rope.to(tl.float32)
            # fp32 operands (interpreter upcast) must not be rounded to tf32, tl.dot's fp32 default.
            scores = tl.dot(q_nope, tl.trans(k_nope), input_precision="ieee") + tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")
            scores = tl.where(keys[None, :] < visible[:, None], scores * scale_log2, float("-inf"))
            m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, scores, k_nope)
        # Whether the row sees a key of this part decides emptiness, never l: NaN and inf inputs make
        # l NaN or 0 and must reach the outputs (0 / 0 = NaN), not look like an empty row. A part the
        # row does not see keeps its raw sum (0, or NaN from 0 * a NaN key) and weight 0.
        seen = first * PAGE < visible
        o = tl.where(seen[:, None], acc / l_i[:, None], acc)
        lse = tl.where(seen, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))  # log2 -> natural log
        if (first == 0) & (last == num_pages):
            out_row = out_ptr + b * stride_ob + token * stride_os + head * stride_oh
            o = tl.where(seen[:, None], o, 0.0)
            tl.store(out_row[:, None] + d_nope[None, :], round_to(o, out_ptr.dtype.element_ty, EXACT_BF16), mask=row_ok[:, None])
            tl.store(lse_ptr + b * stride_lb + head * stride_lh + token, tl.where(seen, lse, float("inf")), mask=row_ok)
        else:
            slot = (tl.load(splits_ptr + b) + split).to(tl.int64)
            acc_row = acc_o_ptr + slot * stride_ai + (kv_head * s_q * group + rows) * stride_ar
            tl.store(acc_row[:, None] + d_nope[None, :], o, mask=row_ok[:, None])
            tl.store(acc_lse_ptr + slot * stride_li + kv_head * s_q * group + rows, lse, mask=row_ok)


@triton.jit
def _mla_combine_kernel(
    out_ptr, lse_ptr, acc_o_ptr, acc_lse_ptr, splits_ptr, seqlens_ptr,
    s_q, group,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_ai, stride_ar, stride_li,
    CAUSAL: tl.constexpr, EXACT_BF16: tl.constexpr, BLOCK_H: tl.constexpr, D_NOPE: tl.constexpr,
):
    b = tl.program_id(0)
    row_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    start = tl.load(splits_ptr + b)
    count = tl.load(splits_ptr + b + 1) - start
    if count <= 1:
        return  # written by the split kernel directly
    rows = row_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < s_q * group
    flat = kv_head * s_q * group + rows
    d = tl.arange(0, D_NOPE)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, D_NOPE), dtype=tl.float32)
    for i in range(0, count):
        slot = (start + i).to(tl.int64)
        part_lse = tl.load(acc_lse_ptr + slot * stride_li + flat, mask=row_ok, other=float("-inf"))
        part_o = tl.load(acc_o_ptr + slot * stride_ai + flat[:, None] * stride_ar + d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, part_lse, propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - m_safe)
        weight = tl.exp(part_lse - m_safe)
        total = total * scale_old + weight
        acc = acc * scale_old[:, None] + part_o * weight[:, None]
        m = m_new
    token = rows // group
    seqlen = tl.load(seqlens_ptr + b)
    if CAUSAL:
        visible = seqlen - s_q + token + 1
    else:
        visible = tl.zeros((BLOCK_H,), dtype=tl.int32) + seqlen
    seen = visible > 0  # emptiness by visibility; NaN / inf partials propagate through the weights
    o = tl.where(seen[:, None], acc / total[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(total), float("inf"))
    head = kv_head * group + rows % group
    out_row = out_ptr + b * stride_ob + token * stride_os + head * stride_oh
    tl.store(out_row[:, None] + d[None, :], round_to(o, out_ptr.dtype.element_ty, EXACT_BF16), mask=row_ok[:, None])
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + token, lse, mask=row_ok)


def mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    *,
    tuning: Tuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both kernels (arguments validated by ``hal.ops.mla``); shapes as in ``hal_mla_decode``.

    ``tuning.mla.block_h`` query rows per program: 16 is tl.dot's minimum and keeps the fp32
    accumulator (block_h x 512) in registers.
    """
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    rows = s_q * group
    num_parts = tile_scheduler_metadata.shape[0]
    out = torch.empty(batch, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    # Every split sequence has at least two slots and each SM part adds at most one split.
    slots = batch + num_parts
    acc_o = torch.empty(slots, h_kv * rows, head_dim_v, dtype=torch.float32, device=q.device)
    acc_lse = torch.empty(slots, h_kv * rows, dtype=torch.float32, device=q.device)
    config = tuning.mla
    block_h = config.block_h
    upcast = dot_operand_dtype(q.dtype) != q.dtype
    common = dict(BLOCK_H=block_h, D_NOPE=D_NOPE, EXACT_BF16=interpreting(), num_warps=config.num_warps, **launch_options(tuning))
    _mla_split_kernel[(triton.cdiv(rows, block_h), num_parts, h_kv)](
        q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
        out, lse, acc_o, acc_lse,
        batch, s_q, group, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        acc_o.stride(0), acc_o.stride(1), acc_lse.stride(0),
        CAUSAL=causal, UPCAST=upcast, PAGE=PAGE, D_ROPE=D_ROPE, num_stages=config.num_stages, **common,
    )
    _mla_combine_kernel[(batch, triton.cdiv(rows, block_h), h_kv)](
        out, lse, acc_o, acc_lse, num_splits, cache_seqlens,
        s_q, group,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        acc_o.stride(0), acc_o.stride(1), acc_lse.stride(0),
        CAUSAL=causal, **common,
    )
    return out, lse


