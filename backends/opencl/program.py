"""Build OpenCL programs once and launch their kernels with errors that name the kernel and device.

In memory, a program is built once per (device, sha256 of the source, build options) and kept
for the process. On disk, pyopencl caches built binaries keyed by source, options and device;
for drivers that cache source builds themselves (PoCL's kernel cache, NVIDIA's) pyopencl defers
to them, so a second process skips compilation either way (``PYOPENCL_NO_CACHE=1`` and
``POCL_KERNEL_CACHE=0`` turn these off).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl

from hal.backends.opencl.device import Runtime
from hal.backends.opencl.errors import OpenCLBuildError, OpenCLLaunchError

__all__ = ["Program", "build", "Size"]

Size = tuple[int, ...]


@dataclass(eq=False)
class Program:
    """A built program of one operator family, with its kernels created once.

    Attributes:
        name: the family (``"mla_decode"``), used in every error message.
        runtime: the device it was built for.
        binary: the pyopencl program.
    """

    name: str
    runtime: Runtime
    binary: cl.Program
    _kernels: dict[str, cl.Kernel] = field(default_factory=dict, repr=False)

    def kernel(self, kernel_name: str, args: Sequence[object]) -> cl.Kernel:
        """The kernel object, created on first use with its scalar types taken from ``args``.

        Declaring the scalar types lets pyopencl pack arguments in one call (about 1 us instead
        of 3 us per argument on every launch).
        """
        kernel = self._kernels.get(kernel_name)
        if kernel is None:
            kernel = cl.Kernel(self.binary, kernel_name)
            kernel.set_scalar_arg_dtypes([arg.dtype if isinstance(arg, np.generic) else None for arg in args])
            self._kernels[kernel_name] = kernel
        return kernel

    def launch(self, kernel_name: str, global_size: Size, local_size: Size | None, *args: object) -> cl.Event:
        """Enqueue ``kernel_name`` (asynchronous); any failure raises :class:`OpenCLLaunchError`.

        ``global_size`` must be a multiple of ``local_size`` in every dimension (OpenCL 1.2).
        Scalar arguments must be numpy scalars of the kernel's parameter types.
        """
        label = f"{self.name}.{kernel_name}"
        try:
            kernel = self.kernel(kernel_name, args)
            kernel.set_args(*args)
            return cl.enqueue_nd_range_kernel(self.runtime.queue, kernel, global_size, local_size)
        except cl.Error as exc:
            raise OpenCLLaunchError(label, self.runtime.name, exc) from exc


_programs: dict[tuple[int, int, str, str], Program] = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _digest(source: str) -> str:
    """sha256 of a kernel source; memoised because launchers look their program up on every call."""
    return hashlib.sha256(source.encode()).hexdigest()


def _options(defines: Mapping[str, int | float | str], options: Sequence[str]) -> str:
    return " ".join([*options, *(f"-D{key}={value}" for key, value in sorted(defines.items()))])


def build(
    runtime: Runtime, name: str, source: str, defines: Mapping[str, int | float | str] | None = None, options: Sequence[str] = ()
) -> Program:
    """The program ``source`` built for ``runtime``'s device (cached; see the module docstring).

    Args:
        runtime: the device to build for.
        name: the operator family, named in errors (``"gemm_fp8"``).
        source: OpenCL C 1.2 source.
        defines: compile-time constants passed as ``-DKEY=VALUE`` (tile sizes, dtypes).
        options: other build options.

    Raises:
        OpenCLBuildError: with the device, the program name and the compiler's build log.
    """
    flags = _options(defines or {}, options)
    key = (runtime.context.int_ptr, runtime.device.int_ptr, _digest(source), flags)
    with _lock:
        program = _programs.get(key)
        if program is not None:
            return program
        pending = cl.Program(runtime.context, source)
        try:
            binary = pending.build(options=flags)
        except cl.Error as exc:
            raise OpenCLBuildError(name, runtime.name, _build_log(pending, runtime, exc), flags) from exc
        program = _programs[key] = Program(name, runtime, binary)
        return program


def _build_log(program: cl.Program, runtime: Runtime, exc: cl.Error) -> str:
    """The compiler's log for ``runtime``'s device, or pyopencl's message (which embeds it) when unreadable."""
    try:
        log = program.get_build_info(runtime.device, cl.program_build_info.LOG)
    except (cl.Error, AttributeError):
        log = ""
    return log if log.strip() else str(exc)
