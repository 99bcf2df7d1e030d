"""Errors of the OpenCL backend: every failure names the device and the program or kernel involved."""

from __future__ import annotations

from hal.errors import HalError

__all__ = ["OpenCLError", "OpenCLDeviceNotFoundError", "OpenCLBuildError", "OpenCLLaunchError"]


class OpenCLError(HalError, RuntimeError):
    """Base class of the OpenCL backend's errors."""


class OpenCLDeviceNotFoundError(OpenCLError, LookupError):
    """``HAL_OPENCL_DEVICE`` (or ``PYOPENCL_CTX``) names no device of this machine, or there is none."""


class OpenCLBuildError(OpenCLError):
    """A kernel program failed to compile.

    Attributes:
        program: name of the program (one operator family: ``mla_decode``, ``gemm_fp8``...).
        device: the device it was built for, in words.
        log: the compiler's build log.
    """

    def __init__(self, program: str, device: str, log: str, options: str) -> None:
        self.program = program
        self.device = device
        self.log = log
        super().__init__(
            f"OpenCL program '{program}' failed to build for {device} (options: {options or 'none'}).\n"
            f"Build log:\n{log.strip() or '(empty)'}"
        )


class OpenCLLaunchError(OpenCLError):
    """Creating a buffer, enqueuing a kernel or waiting for it failed (out of memory included).

    Attributes:
        kernel: the kernel (or buffer operation) that failed.
        device: the device, in words.
    """

    def __init__(self, kernel: str, device: str, cause: Exception) -> None:
        self.kernel = kernel
        self.device = device
        hint = ""
        if "OUT_OF" in str(cause) or "ALLOCATION" in str(cause):
            hint = " The device ran out of memory or resources: use smaller inputs or another device (HAL_OPENCL_DEVICE)."
        super().__init__(
            f"OpenCL kernel '{kernel}' failed on {device}: {cause}.{hint} Outputs of this call are incomplete; discard them."
        )
