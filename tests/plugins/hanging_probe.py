"""A test backend whose availability probe never answers."""

import time

from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="hangs in its probe", priority=1000, device_types=("cpu",))


@hookimpl
def hal_backend_availability():
    time.sleep(3600)
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    raise AssertionError("must never run")
