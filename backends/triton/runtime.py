"""What the shared Triton kernels need to know about where they run.

``TRITON_INTERPRET=1`` runs every kernel in Triton's CPU interpreter (how CI executes the GPU
kernels without a GPU). Triton reads it when a kernel is decorated, so it must be set before
this package is imported.
"""

from __future__ import annotations

import os

import torch

from hal.backends.triton.tuning import Tuning

__all__ = ["interpreting", "dot_operand_dtype", "launch_options"]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def dot_operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention operands are fed to ``tl.dot`` in.

    The interpreter (triton 3.9) returns wrong results for bf16 ``tl.dot`` operands, so bf16 is
    upcast to fp32 there; fp16 and fp32 are exact. On GPUs operands stay in their own dtype.
    """
    if interpreting() and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def launch_options(tuning: Tuning) -> dict:
    """The tuning's extra launch options (none in the interpreter, which has no hardware to tune)."""
    return {} if interpreting() else dict(tuning.launch_options)
