"""ROCm backend plugin: the shared Triton kernels with AMD tuning and FP8 handling.

Registered as ``rocm = "hal.backends.rocm.plugin:backend"``. Verified only in simulation so far.
"""

from __future__ import annotations

from hal.backends.rocm.archs import ARCHS, tuning_for
from hal.backends.rocm.device import detect
from hal.backends.triton.backend import TritonBackend
from hal.backends.triton.tuning import MlaConfig, Tuning, interpreter_gemm_config

_target = detect()
# Unavailable targets still get a tuning object so the backend is uniform; it is never used.
_tuning = tuning_for(ARCHS[_target.identity]) if _target.identity in ARCHS else Tuning("none", interpreter_gemm_config, MlaConfig())
backend = TritonBackend("AMD Instinct GPUs: shared Triton kernels, AMD tuning and FP8 (fnuz) handling; verified only in simulation", _target, _tuning)
