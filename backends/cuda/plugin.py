"""CUDA backend plugin: the shared Triton kernels on NVIDIA GPUs (or simulated in the interpreter).

Registered as ``cuda = "hal.backends.cuda.plugin:backend"``.
"""

from __future__ import annotations

from hal.backends.cuda.device import detect, tuning_for
from hal.backends.triton.backend import TritonBackend

_target = detect()
backend = TritonBackend("NVIDIA GPUs: Triton kernels JIT-compiled per GPU", _target, tuning_for(_target), device_type="cuda")
