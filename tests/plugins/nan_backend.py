"""A deliberately wrong backend: correct results except for one NaN (GEMM) or unwritten rows (masked)."""

import math

from hal.ops.gemm_reference import gemm_fp8_nt_reference, m_grouped_masked_reference
from hal.ops.mla_reference import mla_decode_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="NaN results (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    gemm_fp8_nt_reference(a, a_scales, b, b_scales, out)
    out.view(-1)[out.numel() // 2] = math.nan


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    m_grouped_masked_reference(a, a_scales, b, b_scales, out, masked_m.clamp(max=max(int(masked_m.max()) - 1, 0)), expected_m)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
    lse[0, 0, 0] = math.nan
    return out, lse
