"""NVIDIA CUDA backend (Triton kernels, cupy where Triton cannot serve). Registered; kernels pending."""
