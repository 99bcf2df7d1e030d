"""CUDA backend plugin: registered and probing the machine; its operators are not written yet.

Until its kernels land it implements no operator hook and reports itself unavailable, saying
whether a CUDA device is present, so ``hal backends`` already shows what it would run on.
"""

from __future__ import annotations

import torch

from hal.plugin import Availability, BackendInfo, hookimpl


def _device() -> tuple[str, str]:
    """(device description, reason it is missing)."""
    if torch.version.hip is not None:
        return "", "this torch is a ROCm build (use the rocm backend)"
    if not torch.cuda.is_available():
        return "", "no CUDA device (torch.cuda.is_available() is False)"
    return torch.cuda.get_device_name(), ""


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(description="NVIDIA GPUs: Triton kernels JIT-compiled per GPU, cupy for CUDA C", priority=100, device_types=("cuda",))


@hookimpl
def hal_backend_availability() -> Availability:
    device, missing = _device()
    reasons = [r for r in (missing, "no operators implemented yet (the CUDA backend's kernels are a separate issue)") if r]
    return Availability(False, "; ".join(reasons), device=device)
