"""A backend written against a narrow part of two contracts: the indexer's float32 logits only
(it declares no feature of ``mqa_logits``), and the V3.2 decode's sparse mode without sinks.

High priority, so auto-selection would pick it for everything it claims; the reference serves
what it does not. It runs the reference math and counts its calls.
"""

from hal.ops.indexer_reference import mqa_logits_reference
from hal.ops.mla_v2_reference import mla_decode_v2_reference
from hal.plugin import Availability, BackendInfo, hookimpl

CALLS: list[str] = []


@hookimpl
def hal_backend_info():
    return BackendInfo(
        "narrow features (test plugin)", priority=400, device_types=("cpu",),
        features={"mqa_logits": (), "mla_decode_v2": ("sparse", "fp8_kv", "topk_length", "a_feature_from_the_future")},
    )


@hookimpl
def hal_backend_availability():
    return Availability(True, device="cpu")


@hookimpl
def hal_mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
    CALLS.append("mqa_logits")
    return mqa_logits_reference(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype)


@hookimpl
def hal_mla_decode_v2(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                      extra_k_cache, extra_indices, topk_length, extra_topk_length):
    CALLS.append("mla_decode_v2")
    return mla_decode_v2_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices,
                                   attn_sink, extra_k_cache, extra_indices, topk_length, extra_topk_length)
