"""NVIDIA CUDA backend: the shared Triton kernels (``hal.backends.triton``) on NVIDIA GPUs.

With ``TRITON_INTERPRET=1`` and no GPU the same kernels run in Triton's CPU interpreter on CPU
tensors; the backend then reports itself as simulated (never as a GPU pass).
"""
