"""A test backend whose hal_backend_info breaks its contract: it returns a dict."""

from hal.plugin import Availability, hookimpl


@hookimpl
def hal_backend_info():
    return {"description": "not a BackendInfo", "priority": 1000}


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    raise AssertionError("a backend with a broken info hook must never run")
