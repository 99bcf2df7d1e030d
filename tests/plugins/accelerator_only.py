"""A test backend that is available but only takes tensors of a device type this machine lacks."""

from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="xpu only", priority=500, device_types=("xpu",))


@hookimpl
def hal_backend_availability():
    return Availability(True, device="imaginary xpu")


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    raise AssertionError("must not be called with cpu tensors")
