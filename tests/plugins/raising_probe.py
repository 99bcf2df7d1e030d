"""A vendor plugin that imports fine but whose availability probe raises."""

from hal.plugin import BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="probe raises", priority=300)


@hookimpl
def hal_backend_availability():
    raise RuntimeError("driver crashed while enumerating devices")


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    raise AssertionError("an unavailable backend must never be called")
