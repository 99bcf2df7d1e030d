"""OpenCL backend plugin: registered and probing for an OpenCL platform; operators not written yet."""

from __future__ import annotations

import importlib.util

from hal.plugin import Availability, BackendInfo, hookimpl


def _device() -> tuple[str, str]:
    """(device description, reason it is missing); pyopencl is imported only when installed."""
    if importlib.util.find_spec("pyopencl") is None:
        return "", "pyopencl not installed (pip install 'unihal[opencl]')"
    import pyopencl as cl

    try:
        devices = [f"{p.name}: {d.name}" for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as exc:
        return "", f"no OpenCL platform ({exc})"
    if not devices:
        return "", "no OpenCL device found"
    return devices[0], ""


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(description="any OpenCL 1.2 device through pyopencl (PoCL on CPUs)", priority=50, device_types=("cpu",))


@hookimpl
def hal_backend_availability() -> Availability:
    device, missing = _device()
    reasons = [r for r in (missing, "no operators implemented yet (the OpenCL backend is a separate issue)") if r]
    return Availability(False, "; ".join(reasons), device=device)
