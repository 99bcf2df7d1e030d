"""Torch CPU tensors as OpenCL buffers for one operator call, with as few copies as the device allows.

Where the device computes in host memory (a CPU device with unified memory, checked once by a
probe that writes through ``CL_MEM_USE_HOST_PTR`` into an unaligned host array) every buffer
aliases its tensor: no copy in, no copy out, and results are in the tensor once the queue has
finished. Elsewhere inputs are copied in at creation and outputs copied back at the end of the
call. Tensors are used through their contiguous layout (inputs are made contiguous; outputs must
already be). Inputs start on a 64-byte boundary (a view that does not is copied), so kernels may
read them as whole ``float16``/``ushort16``/``uchar16`` vectors. Partial results that never
leave the device live in scratch buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyopencl as cl
import torch

from hal.backends.opencl.device import Runtime
from hal.backends.opencl.errors import OpenCLError, OpenCLLaunchError

__all__ = ["Bindings", "bind", "shares_host_memory"]

_ALIGNMENT = 64  # bytes: the widest vector a kernel loads (float16), and torch's CPU allocation alignment
_PROBE_SOURCE = "__kernel void probe(__global int* x) { x[get_global_id(0)] = 0x5A5A5A5A; }"


@functools.lru_cache(maxsize=None)
def shares_host_memory(runtime: Runtime) -> bool:
    """Whether kernels write straight into ``CL_MEM_USE_HOST_PTR`` host memory on this device."""
    if not (runtime.is_cpu and runtime.device.host_unified_memory):
        return False
    host = np.zeros(17, dtype=np.int32)[1:]  # misaligned by 4 bytes, as a sliced tensor may be
    try:
        program = cl.Program(runtime.context, _PROBE_SOURCE).build()
        buffer = cl.Buffer(runtime.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
        cl.Kernel(program, "probe")(runtime.queue, (host.size,), None, buffer)
        runtime.queue.finish()
    except cl.Error:
        return False
    return bool((host == 0x5A5A5A5A).all())


def _host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The memory of a contiguous tensor as a uint8 array (no copy; any dtype, fp8 and bf16 included)."""
    return (tensor.reshape(1) if tensor.dim() == 0 else tensor).view(torch.uint8).numpy()


class Bindings:
    """Buffers of one operator call; create through :func:`bind`."""

    def __init__(self, runtime: Runtime, label: str) -> None:
        self.runtime = runtime
        self.label = label
        self.zero_copy = shares_host_memory(runtime)
        self._keep: list[object] = []  # tensors whose memory buffers alias, alive until the call ends
        self._copy_back: list[tuple[np.ndarray, cl.Buffer]] = []

    def _buffer(self, flags: int, *, size: int = 0, host: np.ndarray | None = None) -> cl.Buffer:
        try:
            return cl.Buffer(self.runtime.context, flags, size=size, hostbuf=host)
        except cl.Error as exc:
            raise OpenCLLaunchError(f"{self.label} (buffer of {size or host.nbytes} bytes)", self.runtime.name, exc) from exc

    def input(self, tensor: torch.Tensor) -> cl.Buffer:
        """A read-only buffer holding ``tensor`` (made contiguous first)."""
        tensor = tensor.contiguous()
        # A size-1 dimension may keep any stride in a "contiguous" tensor; byte views need unit strides.
        if tensor.data_ptr() % _ALIGNMENT or (tensor.dim() and tensor.stride(-1) != 1):
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # fresh storage, aligned, unit strides
        if tensor.numel() == 0:
            return self.scratch(1)  # OpenCL has no empty buffers; kernels never read this one
        self._keep.append(tensor)
        host = _host_bytes(tensor)
        placement = cl.mem_flags.USE_HOST_PTR if self.zero_copy else cl.mem_flags.COPY_HOST_PTR
        return self._buffer(cl.mem_flags.READ_ONLY | placement, host=host)

    def output(self, tensor: torch.Tensor) -> cl.Buffer:
        """A buffer whose final contents land in ``tensor`` (contiguous) when the call ends.

        Elements the kernels do not write keep the tensor's values, so in-place outputs may be
        written partially (rows beyond ``masked_m``).
        """
        if not tensor.is_contiguous():
            raise OpenCLError(f"{self.label}: outputs must be contiguous (got strides {tensor.stride()})")
        if tensor.numel() == 0:
            return self.scratch(1)
        self._keep.append(tensor)
        host = _host_bytes(tensor)
        placement = cl.mem_flags.USE_HOST_PTR if self.zero_copy else cl.mem_flags.COPY_HOST_PTR
        buffer = self._buffer(cl.mem_flags.READ_WRITE | placement, host=host)
        if not self.zero_copy:
            self._copy_back.append((host, buffer))
        return buffer

    def scratch(self, nbytes: int) -> cl.Buffer:
        """Device memory for intermediate results; never read by the host."""
        return self._buffer(cl.mem_flags.READ_WRITE, size=max(nbytes, 1))

    def finish(self) -> None:
        """Wait for every enqueued kernel and bring outputs back to their tensors."""
        try:
            for host, buffer in self._copy_back:
                cl.enqueue_copy(self.runtime.queue, host, buffer, is_blocking=False)
            self.runtime.queue.finish()
        except cl.Error as exc:
            raise OpenCLLaunchError(self.label, self.runtime.name, exc) from exc


@contextmanager
def bind(runtime: Runtime, label: str) -> Iterator[Bindings]:
    """Hold ``runtime`` for one operator call named ``label``; on exit wait for the device.

    On success the outputs are complete when the block exits. On failure the queue is drained
    before the error propagates, so no kernel keeps writing into tensors the caller got back.
    """
    with runtime.lock:
        bindings = Bindings(runtime, label)
        try:
            yield bindings
        except BaseException:
            try:
                runtime.queue.finish()
            except cl.Error:
                pass  # the original error says more than a failure to drain after it
            raise
        bindings.finish()
