"""Which OpenCL device the backend runs on, and the process-wide context and queue for it.

Selection, first match wins:

1. ``HAL_OPENCL_DEVICE``: ``"P:D"`` (platform index, device index, as ``hal backends`` and
   :func:`list_devices` number them) or a case-insensitive substring of ``"platform / device"``.
2. ``PYOPENCL_CTX``: pyopencl's own convention, resolved by ``pyopencl.create_some_context``.
3. The first device of the first platform that has one.

One :class:`Runtime` (context, in-order queue, the device's limits) is opened per selection and
kept for the life of the process; changing the variables selects (and opens) another one.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

import pyopencl as cl

from hal.backends.opencl.errors import OpenCLDeviceNotFoundError

__all__ = ["ENV_DEVICE", "Runtime", "runtime", "list_devices", "describe"]

ENV_DEVICE = "HAL_OPENCL_DEVICE"
ENV_PYOPENCL = "PYOPENCL_CTX"


def describe(device: cl.Device) -> str:
    """A device in words: ``"pthread-Intel(R) Xeon(R) Processor (Portable Computing Language)"``."""
    return f"{device.name.strip()} ({device.platform.name.strip()})"


def list_devices() -> list[tuple[str, cl.Device]]:
    """Every device of every platform as ``("P:D", device)``; empty when no platform is installed."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader reports "no platform" as an error
        return []
    found = []
    for p, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:  # a platform without devices raises DEVICE_NOT_FOUND
            continue
        found += [(f"{p}:{d}", device) for d, device in enumerate(devices)]
    return found


@dataclass(frozen=True)
class Runtime:
    """An opened device: what every launcher needs.

    Attributes:
        device, context, queue: the pyopencl objects (the queue is in-order).
        name: the device in words (:func:`describe`).
        compute_units, max_work_group_size, local_mem_size: the device's limits that size
            work-groups and local-memory tiles.
        is_cpu: CL_DEVICE_TYPE_CPU; CPUs pay tens of microseconds per command and run one
            work-group per core, so launchers prefer fewer, larger work-groups there.
        correctly_rounded_divide: whether ``-cl-fp32-correctly-rounded-divide-sqrt`` may be used.
        lock: serialises operator calls (kernel arguments are set on shared kernel objects).
    """

    device: cl.Device
    context: cl.Context
    queue: cl.CommandQueue
    name: str
    compute_units: int
    max_work_group_size: int
    local_mem_size: int
    is_cpu: bool
    correctly_rounded_divide: bool
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)


def _choose(selector: str) -> cl.Device:
    devices = list_devices()
    if not devices:
        raise OpenCLDeviceNotFoundError("no OpenCL device found: install a driver or 'pip install unihal[opencl]' for PoCL")
    for index, device in devices:
        if selector.strip() == index:
            return device
    needle = selector.strip().lower()
    for _, device in devices:
        if needle and needle in f"{device.platform.name} / {device.name}".lower():
            return device
    known = "; ".join(f"{index} = {describe(device)}" for index, device in devices)
    raise OpenCLDeviceNotFoundError(
        f"{ENV_DEVICE}={selector!r} matches no OpenCL device. Use 'P:D' or part of a name; devices here: {known}"
    )


@functools.lru_cache(maxsize=None)
def _open(selector: str | None, pyopencl_ctx: str | None) -> Runtime:
    if selector is not None:
        context = cl.Context([_choose(selector)])
    elif pyopencl_ctx is not None:
        try:
            context = cl.create_some_context(interactive=False)
        except (cl.Error, RuntimeError, ValueError, IndexError) as exc:
            raise OpenCLDeviceNotFoundError(f"{ENV_PYOPENCL}={pyopencl_ctx!r} selects no OpenCL device: {exc}") from exc
    else:
        devices = list_devices()
        if not devices:
            raise OpenCLDeviceNotFoundError("no OpenCL platform or device found: install a driver or 'pip install unihal[opencl]' for PoCL")
        context = cl.Context([devices[0][1]])
    device = context.devices[0]
    return Runtime(
        device=device,
        context=context,
        queue=cl.CommandQueue(context, device),
        name=describe(device),
        compute_units=device.max_compute_units,
        max_work_group_size=device.max_work_group_size,
        local_mem_size=device.local_mem_size,
        is_cpu=bool(device.type & cl.device_type.CPU),
        correctly_rounded_divide=bool(device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT),
    )


def runtime() -> Runtime:
    """The runtime of the device the environment selects (opened on first use, then cached)."""
    return _open(os.environ.get(ENV_DEVICE) or None, os.environ.get(ENV_PYOPENCL) or None)
