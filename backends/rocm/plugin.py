"""ROCm backend plugin: registered and probing the machine; its operators are not written yet."""

from __future__ import annotations

import torch

from hal.plugin import Availability, BackendInfo, hookimpl


def _device() -> tuple[str, str]:
    """(device description, reason it is missing)."""
    if torch.version.hip is None:
        return "", "this torch is not a ROCm build (torch.version.hip is None)"
    if not torch.cuda.is_available():
        return "", "no AMD GPU visible to torch"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({getattr(props, 'gcnArchName', 'unknown gfx arch')})", ""


@hookimpl
def hal_backend_info() -> BackendInfo:
    # ROCm tensors report device type "cuda" in PyTorch.
    return BackendInfo(description="AMD GPUs: the shared Triton kernels with AMD configs and FP8 (fnuz) handling", priority=100, device_types=("cuda",))


@hookimpl
def hal_backend_availability() -> Availability:
    device, missing = _device()
    reasons = [r for r in (missing, "no operators implemented yet (the ROCm backend is a separate issue)") if r]
    return Availability(False, "; ".join(reasons), device=device)
