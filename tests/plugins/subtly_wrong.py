"""Deliberately wrong backends whose errors hide in the anchors' global metrics: one element, one
row, one page, one expert's group. Conformance must fail each of them by its per-element bound."""

import torch

from hal.ops.gemm_reference import gemm_fp8_nt_reference, m_grouped_contiguous_reference
from hal.ops.mla_reference import mla_decode_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="one wrong element, row, page or group (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    """One element: the last output off by one (the audit's `out[-1, -1] += 1`)."""
    gemm_fp8_nt_reference(a, a_scales, b, b_scales, out)
    out[-1, -1] += 1


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    """One row, or one page: the last query head of the last sequence gets its neighbour's output
    (a head-indexing slip); where that sequence spans several pages, it reads its second page
    from the wrong block instead."""
    table = block_table.clone()
    last = cache_seqlens.shape[0] - 1
    if int(cache_seqlens[last]) > 64 and table.shape[1] > 1:
        table[last, 1] = table[last, 0]
        return mla_decode_reference(q, k_cache, table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
    out, lse = mla_decode_reference(q, k_cache, table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
    out[last, -1, -1] = out[last, -1, -2]
    return out, lse


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    """One expert's group: expert 1's rows scaled by 1.02 (a wrong scale for one expert)."""
    m_grouped_contiguous_reference(a, a_scales, b, b_scales, out, m_indices)
    rows = m_indices == 1
    out[rows] = (out[rows].float() * 1.02).to(out.dtype)


@hookimpl
def hal_mla_decode_v2(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
    extra_k_cache, extra_indices, topk_length, extra_topk_length,
):
    """One row: the first token's last head gets its neighbour's output."""
    from hal.ops.mla_v2_reference import mla_decode_v2_reference

    out, lse = mla_decode_v2_reference(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
        extra_k_cache, extra_indices, topk_length, extra_topk_length,
    )
    out[0, 0, -1] = out[0, 0, -2]
    return out, lse


@hookimpl
def hal_mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    """One row: the last token's last head gets its neighbour's output."""
    from hal.ops.mla_v2_reference import mla_sparse_prefill_reference

    out, max_logits, lse = mla_sparse_prefill_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    out[-1, -1] = out[-1, -2]
    return out, max_logits, lse
