"""Typed errors raised by unihal.

Every error derives from :class:`HalError`, and also from the builtin exception a Python user
would catch for that kind of mistake (``ValueError`` for a bad shape, ``TypeError`` for a bad
dtype, ``LookupError`` for an unknown backend...). Argument errors carry the argument's name,
what was expected, what was given and what to do, both as attributes and in the message.
"""

from __future__ import annotations

__all__ = [
    "HalError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "LayoutError",
    "ValueRangeError",
    "BackendError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "OperatorNotSupportedError",
    "FeatureNotSupportedError",
]


class HalError(Exception):
    """Base class of every error unihal raises on purpose."""


class ArgumentError(HalError):
    """An operator argument does not meet the operator's contract.

    Attributes:
        op: public name of the operator that rejected the call.
        argument: name of the offending argument (``"block_table"``, ``"sa"``...).
        expected: what the contract requires, in words.
        actual: what was given, in words.
        fix: what the caller should do.
    """

    def __init__(self, op: str, argument: str, expected: str, actual: str, fix: str = "") -> None:
        self.op = op
        self.argument = argument
        self.expected = expected
        self.actual = actual
        self.fix = fix
        message = f"{op}: argument '{argument}' expected {expected}, got {actual}."
        if fix:
            message += f" {fix}"
        super().__init__(message)


class ShapeError(ArgumentError, ValueError):
    """Wrong rank or size of a tensor argument."""


class DTypeError(ArgumentError, TypeError):
    """Wrong dtype of a tensor argument (or a non-tensor where a tensor is required)."""


class DeviceError(ArgumentError, ValueError):
    """Tensors on different devices, or on a device the selected backend cannot use."""


class LayoutError(ArgumentError, ValueError):
    """Wrong memory layout: non-contiguous where the operator writes or reads K-major data."""


class ValueRangeError(ArgumentError, ValueError):
    """Tensor contents out of range: block ids, sequence lengths, expert ids, masked row counts."""


class BackendError(HalError):
    """Base class of backend discovery and selection errors."""


class UnknownBackendError(BackendError, LookupError):
    """A backend name that no installed plugin registers."""


class BackendUnavailableError(BackendError, RuntimeError):
    """A known backend that cannot run on this machine (missing device, driver or package)."""


class OperatorNotSupportedError(BackendError, NotImplementedError):
    """The selected backend does not implement the requested operator, or not for these inputs."""


class FeatureNotSupportedError(OperatorNotSupportedError):
    """The selected backend implements the operator but not a feature this call uses.

    Attributes:
        op: the operator's name.
        backend: the backend that lacks the features.
        missing: the features the call uses that the backend does not declare.
        capable: backends that declare every feature the call uses.
    """

    def __init__(self, op: str, backend: str, missing: tuple[str, ...], capable: tuple[str, ...], message: str) -> None:
        self.op, self.backend, self.missing, self.capable = op, backend, missing, capable
        super().__init__(message)
