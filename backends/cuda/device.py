"""What the CUDA backend runs on (an NVIDIA GPU, Triton's CPU interpreter, or nothing and why) and
the kernel tuning for it."""

from __future__ import annotations

import importlib.util
import torch

from hal.backends.triton.backend import Target
from hal.backends.triton.runtime import interpreting
from hal.backends.triton.tuning import MlaConfig, Tuning, interpreter_gemm_config, nvidia_gemm_config

__all__ = ["detect", "tuning_for", "MIN_CAPABILITY", "FP8_DOT_CAPABILITY"]

MIN_CAPABILITY = (8, 0)  # bf16 and the Triton features the kernels use
FP8_DOT_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


def detect() -> Target:
    if importlib.util.find_spec("triton") is None:
        return Target(False, False, "triton not installed (pip install 'unihal[cuda]')")
    if interpreting():
        return Target(True, True, "Triton CPU interpreter (TRITON_INTERPRET=1): simulated, CPU tensors")
    if torch.version.hip is not None:
        return Target(False, False, "this torch is a ROCm build (use the rocm backend)")
    if not torch.cuda.is_available():
        return Target(False, False, "no CUDA device (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 to simulate on the CPU")
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if capability < MIN_CAPABILITY:
        return Target(False, False, f"{name} has compute capability {capability[0]}.{capability[1]}; the kernels need 8.0+")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return Target(True, False, f"{name} (sm_{capability[0]}{capability[1]}, {sms} SMs)", f"sm{capability[0]}{capability[1]}")


def tuning_for(target: Target) -> Tuning:
    """Interpreter tiles when simulated (or unavailable: the tuning is then never used), else the
    NVIDIA table with FP8 dot where the GPU's compute capability has it."""
    if target.simulated or not target.available:
        return Tuning("interpreter", interpreter_gemm_config, MlaConfig(num_stages=1))
    fp8_dot = torch.cuda.get_device_capability() >= FP8_DOT_CAPABILITY
    return Tuning(target.identity, nvidia_gemm_config, MlaConfig(), fp8_dot=fp8_dot)
