"""Optional dependencies the core may use when installed, never requires.

NumPy is one: torch runs without it, and so must unihal. The host-side paths that run on every
operator call (value checks of CPU index tensors, schedules computed for CPU backends) use it
when present, because a NumPy operation on a small array costs well under a microsecond of
dispatch where a torch operator call costs several; without it they take the torch path.
"""

from __future__ import annotations

from typing import Any

__all__ = ["numpy"]

_NUMPY: Any = None


def numpy() -> Any:
    """The ``numpy`` module, or None when it is not installed (looked up once)."""
    global _NUMPY
    if _NUMPY is None:
        try:
            import numpy as module
        except ImportError:
            module = False
        _NUMPY = module
    return _NUMPY or None
