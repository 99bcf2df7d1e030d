"""What a backend plugin imports: the ``hookimpl`` marker and the two records it returns.

A backend is a Python module registered under the entry-point group ``hal.backends``::

    [project.entry-points."hal.backends"]
    myvendor = "myvendor_hal.plugin"

The module defines ``@hookimpl`` functions named after the hooks in :mod:`hal.hookspecs`:
``hal_backend_info`` and ``hal_backend_availability`` always, then one function per operator it
implements. Operators it does not define are reported as unsupported; there is no silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

__all__ = ["PROJECT", "hookimpl", "BackendInfo", "Availability"]

PROJECT = "hal"
ENTRY_POINT_GROUP = "hal.backends"

hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about a backend, known without touching any device.

    Attributes:
        description: one line shown by ``hal backends``.
        priority: automatic selection prefers higher values (reference: 0; device backends: 100).
        device_types: torch device types whose tensors the backend consumes (``("cuda",)``,
            ``("cpu",)``); ``None`` means any device.
    """

    description: str
    priority: int = 0
    device_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Availability:
    """Whether the backend can run on this machine, and why not.

    Attributes:
        available: True when every operator the backend implements can run here.
        reason: when unavailable, what is missing and how to get it ("no CUDA device",
            "pyopencl not installed: pip install 'unihal[opencl]'").
        device: the device the backend found, in words ("NVIDIA H100 80GB HBM3", "PoCL cpu").
        simulated: True when kernels run in a simulator or interpreter rather than on the
            hardware they target; results are then never reported as a hardware pass.
    """

    available: bool
    reason: str = ""
    device: str = ""
    simulated: bool = False
