"""AMD ROCm backend: the shared Triton kernels (``hal.backends.triton``) with AMD's tuning and FP8 format.

Verified only in simulation (Triton's CPU interpreter with ``HAL_ROCM_SIMULATE_ARCH``) until it
is run on AMD hardware; see the README for the command to run there.
"""
