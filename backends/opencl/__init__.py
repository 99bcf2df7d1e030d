"""OpenCL 1.2 backend through pyopencl (PoCL on CPUs, any vendor's OpenCL device): every operator as OpenCL C kernels."""
