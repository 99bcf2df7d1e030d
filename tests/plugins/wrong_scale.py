"""A deliberately wrong backend: the FP8 GEMM applies the LHS scale of the first K block to every K block
(a per-token instead of per-token-per-128-channel scale layout)."""

from hal.ops.gemm_reference import gemm_fp8_nt_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="wrong scale layout (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    per_token = a_scales[:, :1].expand_as(a_scales)
    gemm_fp8_nt_reference(a, per_token, b, b_scales, out)
