"""AMD ROCm backend (the shared Triton kernels, AMD's configs and FP8 format). Registered; kernels pending."""
