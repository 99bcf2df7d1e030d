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


@hookimpl
def hal_mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
    """One element: the last row's first seen logit 1% off (one head term weighted wrongly)."""
    from hal.ops.indexer_reference import mqa_logits_reference

    out = mqa_logits_reference(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype)
    row = out[-1]
    first = int(torch.isfinite(row.float()).nonzero()[0])
    row[first] = (row[first].float() * 1.01).to(out.dtype)
    return out


@hookimpl
def hal_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype):
    """One page: the first sequence reads its second page from its first page's block."""
    from hal.ops.indexer_reference import paged_mqa_logits_reference

    table = block_table.clone()
    table[0, 1] = table[0, 0]
    return paged_mqa_logits_reference(q, kv_cache, weights, context_lens, table, max_context_len, clean_logits, logits_dtype)


@hookimpl
def hal_quantize_mla_kv_cache(k_cache):
    """The clamp on amax instead of on amax / 448 (an easy misreading of the recipe): only tiles
    whose amax is under 0.0448 differ."""
    return _clamped_amax(k_cache)


def _clamped_amax(k_cache):
    from hal.ops import mla_fp8_cache as cache

    blocks, page = k_cache.shape[:2]
    values = k_cache.reshape(blocks, page, 576).float()
    latent = values[..., :512].reshape(blocks, page, 4, 128)
    amax = latent.abs().amax(dim=-1).clamp(min=1e-4)
    scales = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    out = cache.quantize_mla_kv_cache_reference(k_cache).view(torch.uint8).view(blocks, page, 656).clone()
    out[..., :512] = (latent / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(blocks, page, 512).view(torch.uint8)
    out[..., 512:528] = scales.contiguous().view(torch.uint8).view(blocks, page, 16)
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, 656)


@hookimpl
def hal_gemm_bf16_nt(a, b, out):
    """One element: the last output off by 1% of the largest output (beyond any rounding of it)."""
    from hal.ops.gemm_bf16 import gemm_bf16_reference

    result = gemm_bf16_reference(a, b)
    result[-1, -1] += 0.01 * result.abs().max()
    out.copy_(result)


@hookimpl
def hal_m_grouped_gemm_bf16_nt_masked(a, b, out, masked_m, expected_m):
    """One expert's rows from the next expert's weights (a group-indexing slip)."""
    from hal.ops.gemm_bf16 import gemm_bf16_reference

    for g, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            out[g, :rows] = gemm_bf16_reference(a[g, :rows], b[(g + 1) % b.shape[0]] if g == 0 else b[g]).to(out.dtype)
