"""Kernel tests for the shared Triton kernels.

They need a GPU or Triton's CPU interpreter, which must be enabled before Triton is imported:
without a GPU, tests/test_cuda_backend.py runs this folder in a child process with
TRITON_INTERPRET=1, and the main test process does not collect it.
"""

import os

import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
