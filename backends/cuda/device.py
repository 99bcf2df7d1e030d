"""What the CUDA backend runs on: an NVIDIA GPU, Triton's CPU interpreter, or nothing (and why)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

__all__ = ["Target", "detect", "MIN_CAPABILITY"]

MIN_CAPABILITY = (8, 0)  # bf16 and the Triton features the kernels use


@dataclass(frozen=True)
class Target:
    """Where kernels run: ``available``, ``simulated`` (interpreter) and a description or reason."""

    available: bool
    simulated: bool
    description: str


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def detect() -> Target:
    if importlib.util.find_spec("triton") is None:
        return Target(False, False, "triton not installed (pip install 'unihal[cuda]')")
    if _interpreting():
        return Target(True, True, "Triton CPU interpreter (TRITON_INTERPRET=1): simulated, CPU tensors")
    if torch.version.hip is not None:
        return Target(False, False, "this torch is a ROCm build (use the rocm backend)")
    if not torch.cuda.is_available():
        return Target(False, False, "no CUDA device (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to simulate on the CPU")
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if capability < MIN_CAPABILITY:
        return Target(False, False, f"{name} has compute capability {capability[0]}.{capability[1]}; the kernels need 8.0+")
    props = torch.cuda.get_device_properties(0)
    return Target(True, False, f"{name} (sm_{capability[0]}{capability[1]}, {props.multi_processor_count} SMs)")
