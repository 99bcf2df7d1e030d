"""Reference backend: every operator through the references in ``hal.ops``, on any torch device.

It is the numerical contract that ``hal conformance`` certifies other backends against, and the
last link of fallback chains. Its priority is the lowest so that any available device backend
wins automatic selection.
"""

from __future__ import annotations

import torch

from hal.ops.ep import dispatch_layout_reference
from hal.ops.ep_local import combine_reduce_reference, pack_reference, unpack_reference
from hal.ops.fp8_quant import per_block_cast_reference, per_token_cast_reference
from hal.ops.gemm_reference import gemm_fp8_nt_reference, m_grouped_contiguous_reference, m_grouped_masked_reference
from hal.ops.mla_reference import mla_decode_reference
from hal.ops.gemm_bf16 import gemm_bf16_reference
from hal.ops.mla_fp8_cache import quantize_mla_kv_cache_reference
from hal.ops.indexer_reference import mqa_logits_reference, paged_mqa_logits_reference
from hal.ops.mla_v2_reference import mla_decode_v2_reference, mla_sparse_prefill_reference
from hal.plugin import Availability, BackendInfo, current_contracts, hookimpl


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(
        description="pure PyTorch reference (Hopper numerics), any torch device", priority=0, device_types=None,
        contract_versions=current_contracts(),
    )


@hookimpl
def hal_backend_availability() -> Availability:
    return Availability(True, device=f"torch {torch.__version__}, any device")


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    return mla_decode_reference(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
    )


@hookimpl
def hal_mla_decode_v2(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
    extra_k_cache, extra_indices, topk_length, extra_topk_length,
):
    return mla_decode_v2_reference(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
        extra_k_cache, extra_indices, topk_length, extra_topk_length,
    )


@hookimpl
def hal_mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    return mla_sparse_prefill_reference(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


@hookimpl
def hal_gemm_bf16_nt(a, b, out):
    out.copy_(gemm_bf16_reference(a, b))


@hookimpl
def hal_m_grouped_gemm_bf16_nt_contiguous(a, b, out, m_indices):
    groups = m_indices.long()
    for g in torch.unique(groups).tolist():
        if g >= 0:
            rows = (groups == g).nonzero().squeeze(1)
            out[rows] = gemm_bf16_reference(a[rows], b[g]).to(out.dtype)


@hookimpl
def hal_m_grouped_gemm_bf16_nt_masked(a, b, out, masked_m, expected_m):
    for g, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            out[g, :rows] = gemm_bf16_reference(a[g, :rows], b[g]).to(out.dtype)


@hookimpl
def hal_quantize_mla_kv_cache(k_cache):
    return quantize_mla_kv_cache_reference(k_cache)


@hookimpl
def hal_mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
    return mqa_logits_reference(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype)


@hookimpl
def hal_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype):
    return paged_mqa_logits_reference(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    gemm_fp8_nt_reference(a, a_scales, b, b_scales, out)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    m_grouped_contiguous_reference(a, a_scales, b, b_scales, out, m_indices)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    m_grouped_masked_reference(a, a_scales, b, b_scales, out, masked_m, expected_m)


@hookimpl
def hal_per_token_cast_to_fp8(x):
    return per_token_cast_reference(x)


@hookimpl
def hal_per_block_cast_to_fp8(x):
    return per_block_cast_reference(x)


@hookimpl
def hal_ep_dispatch_layout(topk_idx, num_experts, num_ranks):
    return dispatch_layout_reference(topk_idx, num_experts, num_ranks)


@hookimpl
def hal_ep_pack(rows, bucket_idx, num_buckets):
    return pack_reference(rows, bucket_idx, num_buckets)


@hookimpl
def hal_ep_unpack(rows, bucket_of_row, num_buckets, num_slots):
    return unpack_reference(rows, bucket_of_row, num_buckets, num_slots)


@hookimpl
def hal_ep_combine_reduce(rows, src_idx, num_tokens, weights):
    return combine_reduce_reference(rows, src_idx, num_tokens, weights)
