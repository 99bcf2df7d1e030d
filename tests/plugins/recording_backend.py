"""A test vendor backend: implements two operators by delegating to the reference numerics and
records each call, so tests can see which backend selection routed a call to."""

from hal.ops.gemm_reference import gemm_fp8_nt_reference
from hal.ops.mla_reference import mla_decode_reference
from hal.plugin import Availability, BackendInfo, hookimpl

CALLS: list[str] = []


@hookimpl
def hal_backend_info():
    return BackendInfo(description="records calls; cpu only", priority=200, device_types=("cpu",))


@hookimpl
def hal_backend_availability():
    return Availability(True, device="test cpu")


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    CALLS.append("gemm_fp8_nt")
    gemm_fp8_nt_reference(a, a_scales, b, b_scales, out)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    CALLS.append("mla_decode")
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
