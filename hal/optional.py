"""Optional dependencies the core may use when installed, never requires.

NumPy is one: torch runs without it, and so must unihal. The host-side paths that run on every
operator call (value checks of CPU index tensors, schedules computed for CPU backends) use it
when present, because a NumPy operation on a small array costs well under a microsecond of
dispatch where a torch operator call costs several; without it they take the torch path.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["numpy", "numpy_for", "host_readable"]

_NUMPY: Any = None


def numpy() -> Any:
    """The ``numpy`` module, or None when it is not installed or torch cannot hand it tensors
    (a torch built without NumPy support); looked up once."""
    global _NUMPY
    if _NUMPY is None:
        try:
            import numpy as module

            torch.zeros(1, dtype=torch.int32).numpy()  # an explicit dtype: the default may be bf16, which NumPy lacks
        except Exception:  # absent, or a torch built without NumPy support: the torch paths serve
            module = False
        _NUMPY = module
    return _NUMPY or None


def host_readable(*tensors: torch.Tensor) -> bool:
    """Whether the values of every one of ``tensors`` may be read on the host without torch
    operations (NumPy, or ``tolist()``): plain CPU tensors (no subclass such as a FakeTensor),
    outside torch.compile and outside any dispatch mode (make_fx and other tracers, which must see
    torch operations to record them)."""
    for tensor in tensors:
        if type(tensor) is not torch.Tensor or not tensor.is_cpu:  # is_cpu: 50 ns, device.type: 300 ns
            return False
    return not _tracing()


def numpy_for(*tensors: torch.Tensor) -> Any:
    """NumPy, when every one of ``tensors`` may be read through it (:func:`host_readable`). Else
    None: take the torch path."""
    for tensor in tensors:
        if type(tensor) is not torch.Tensor or not tensor.is_cpu:
            return None
    if _tracing():
        return None
    return _NUMPY if _NUMPY else numpy()


def _tracing() -> bool:
    """Under torch.compile or a dispatch or function mode: torch operations must be seen."""
    return torch.compiler.is_compiling() or bool(_dispatch_stack()) or _function_mode()  # Dynamo folds the first


_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
