"""Errors of :mod:`hal.ep`, beside the argument errors of :mod:`hal.errors` it also raises.

Argument errors (a bad ``topk_idx``, hidden sizes that differ between ranks) are raised as the
usual :class:`hal.ShapeError`, :class:`hal.DTypeError`, ... on every rank of the group: the rank
whose argument is wrong raises its own error, the others the same type naming that rank.
"""

from __future__ import annotations

from hal.errors import HalError

__all__ = ["EPError", "EPMismatchError", "EPTimeoutError"]


class EPError(HalError):
    """Base of the errors raised by expert-parallel communication."""


class EPMismatchError(EPError, ValueError):
    """Ranks disagree about what they are doing: different operations, operations out of step,
    or low-latency combine arguments that do not match the dispatch whose handle they pass."""


class EPTimeoutError(EPError, TimeoutError):
    """A collective of ``op`` did not complete within the Buffer's timeout on this rank.

    Raised when a peer stalls, dies or leaves the group (a peer that dies is often reported at
    once by the transport, well before the timeout). The Buffer cannot be used afterwards: its
    process group is in an unknown state.

    Attributes:
        op: the Buffer method (``"Buffer.dispatch"``).
        phase: which exchange of it (``"header"``, ``"layout counts"``, ``"tokens"``).
        rank: this process's rank in the group.
        elapsed_s: seconds since the operation began.
        timeout_s: the bound.
        cause: what the communication library reported, or "" when the deadline passed.
    """

    def __init__(self, op: str, phase: str, rank: int, elapsed_s: float, timeout_s: float, cause: str = "") -> None:
        self.op, self.phase, self.rank = op, phase, rank
        self.elapsed_s, self.timeout_s, self.cause = elapsed_s, timeout_s, cause
        reported = f": {cause}" if cause else ""
        super().__init__(
            f"{op} on rank {rank}: the {phase} exchange did not complete ({elapsed_s:.1f} s elapsed, timeout {timeout_s:g} s); "
            f"a peer stalled, died or left the group{reported}. Check the other ranks' logs; set the bound with "
            "Buffer(group, timeout_s=...) or HAL_EP_TIMEOUT_S."
        )
