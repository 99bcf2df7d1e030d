"""What the ROCm backend runs on: an AMD GPU, a simulated gfx arch in Triton's interpreter, or
nothing (and why)."""

from __future__ import annotations

import importlib.util
import os

import torch

from hal.backends.rocm.archs import ARCHS, arch_of
from hal.backends.triton.backend import Target
from hal.backends.triton.runtime import interpreting

__all__ = ["ENV_SIMULATE_ARCH", "detect"]

ENV_SIMULATE_ARCH = "HAL_ROCM_SIMULATE_ARCH"


def _known() -> str:
    return ", ".join(f"{a.name} ({a.products})" for a in ARCHS.values())


def detect() -> Target:
    if importlib.util.find_spec("triton") is None:
        return Target(False, False, "triton not installed (pip install 'unihal[rocm]')")
    simulated_arch = os.environ.get(ENV_SIMULATE_ARCH, "").strip()
    if interpreting():
        if not simulated_arch:
            return Target(False, False, f"Triton interpreter active but no arch to simulate: set {ENV_SIMULATE_ARCH} to one of {_known()}")
        if simulated_arch not in ARCHS:
            return Target(False, False, f"{ENV_SIMULATE_ARCH}={simulated_arch} is not a known arch; known: {_known()}")
        return Target(True, True, f"{simulated_arch} simulated in the Triton CPU interpreter (not verified on AMD hardware)", simulated_arch)
    if torch.version.hip is None:
        return Target(False, False, f"this torch is not a ROCm build (torch.version.hip is None); to simulate: TRITON_INTERPRET=1 {ENV_SIMULATE_ARCH}=gfx942")
    if not torch.cuda.is_available():
        return Target(False, False, "no AMD GPU visible to torch")
    props = torch.cuda.get_device_properties(0)
    arch = arch_of(getattr(props, "gcnArchName", ""))
    if arch not in ARCHS:
        return Target(False, False, f"{props.name} is {arch or 'an unknown arch'}; the ROCm backend knows {_known()}")
    return Target(True, False, f"{props.name} ({arch}, {props.multi_processor_count} CUs)", arch)
