"""Triton kernels shared by the GPU backends (cuda, rocm). Not a backend: no entry point.

Each kernel module holds the ``@triton.jit`` kernel and its launcher; vendor folders hold only
their detection, tuning tables and format differences.
"""
