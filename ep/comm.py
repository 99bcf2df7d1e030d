"""The collectives of one Buffer on its process group, each bounded by the operation's deadline.

Every Buffer operation starts a deadline (``timeout_s``, default :data:`DEFAULT_TIMEOUT_S` or
``HAL_EP_TIMEOUT_S``) and issues its collectives asynchronously, waiting on each at most until
the deadline. gloo honours ``Work.wait(timeout)`` (checked: a stalled peer raises "Operation
timed out!", a dead one "Connection closed by peer" at once); NCCL work is polled with
``Work.is_completed()`` so that the CPU never blocks past the deadline either. Any failure, or
the deadline passing, raises :class:`~hal.ep.errors.EPTimeoutError` naming the operation and
marks the communicator failed: the group's state is unknown once a collective is abandoned.

Payloads travel as uint8 rows (see :mod:`hal.ep.message`), which both gloo and NCCL move
whatever the tokens' dtype (gloo has no float8).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hal.ep.errors import EPError, EPTimeoutError
from hal.ep.message import Field, Frame
from hal.ops.ep_local import ep_pack

__all__ = ["DEFAULT_TIMEOUT_S", "ENV_TIMEOUT", "Communicator", "Outgoing", "resolve_timeout", "group_device"]

# DeepEP's host-side timeout (csrc/kernels/configs.cuh: NUM_CPU_TIMEOUT_SECS = 100).
DEFAULT_TIMEOUT_S = 100.0
ENV_TIMEOUT = "HAL_EP_TIMEOUT_S"
MAX_TIMEOUT_S = 86400.0  # a day: longer is a mistake (inf, 1e20) that overflows the libraries' timers
_POLL_S = 2e-4


def _all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    # Recent torch deprecates all_gather_into_tensor for all_gather_single; older ones (>= 2.4 is supported) lack the latter.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, mine, group=group, async_op=True)


def resolve_timeout(timeout_s: float | None) -> float:
    """The explicit value, else ``HAL_EP_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`; must be > 0."""
    source = "timeout_s"
    if timeout_s is None:
        text = os.environ.get(ENV_TIMEOUT, "").strip()
        source = ENV_TIMEOUT
        try:
            timeout_s = float(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            raise EPError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds") from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise EPError(
            f"{source}={timeout_s!r}: the EP timeout must be a positive number of seconds, at most {MAX_TIMEOUT_S:g} "
            f"(DeepEP's is {DEFAULT_TIMEOUT_S:g}); an unbounded wait would turn a dead peer into a hang"
        )
    return float(timeout_s)


def group_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class Outgoing:
    """The rows of one exchange, prepared before the ranks agree (:meth:`Communicator.prepare_rows`).

    Attributes:
        frame: the message layout (its fields, in order).
        src_idx: int32 [S], the message row each sent row is, destination-major (None: the
            messages are already in send order).
        counts: int32 [num_buckets], rows per bucket (None without buckets).
        rows: what the communicator moves: framed int64 words [S, width / 8] (torch.distributed),
            or each field's tensor as given (shared memory, which gathers straight into its slots).
    """

    frame: Frame
    src_idx: torch.Tensor | None
    counts: torch.Tensor | None
    rows: torch.Tensor | dict[str, torch.Tensor]


class Communicator:
    """Collectives on ``group`` for one Buffer; one operation at a time.

    Attributes:
        group, rank, world: the process group, this rank in it and its size.
        device: where headers and payloads must live (:func:`group_device`).
        timeout_s: the bound of each operation.
        owner: a process-local id of the Buffer, recorded in its handles.
        failure: why the communicator is unusable, or None.
    """

    _next_owner = 0

    def __init__(self, group: dist.ProcessGroup, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = group_device(group)
        self.timeout_s = timeout_s
        Communicator._next_owner += 1
        self.owner = Communicator._next_owner
        self.failure: str | None = None
        self._operations = 0
        self._op = ""
        self._started = 0.0

    def begin(self, op: str) -> int:
        """Start operation ``op``: its deadline, and its number (equal on every rank in step)."""
        if self.failure is not None:
            raise EPError(f"{op}: this Buffer cannot communicate any more ({self.failure}); create a new process group and Buffer.")
        self._op = op
        self._started = time.monotonic()
        self._operations += 1
        return self._operations

    def all_gather_ints(self, values: Sequence[int], phase: str) -> torch.Tensor:
        """Every rank's ``values`` (same length on all ranks) as int64 [R, len] on the CPU."""
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=self.device)
        self._run(lambda: _all_gather_flat(out, mine, self.group), phase)
        return out.view(self.world, -1).cpu()

    def all_gather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        """Every rank's ``data`` (any lengths)."""
        lengths = self.all_gather_ints([len(data)], phase)[:, 0].tolist()
        width = max(max(lengths), 1)
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = torch.empty(self.world * width, dtype=torch.uint8, device=self.device)
        self._run(lambda: _all_gather_flat(out, mine.to(self.device), self.group), phase)
        gathered = out.view(self.world, width).cpu()
        return [bytes(gathered[r, :n].tolist()) for r, n in enumerate(lengths)]

    def prepare_rows(
        self, fields: Sequence[Field], message: Mapping[str, torch.Tensor], bucket_idx: torch.Tensor | None = None, num_buckets: int = 0
    ) -> Outgoing:
        """Prepare messages (each field's tensor ``[N, *field.shape]``) for :meth:`exchange`.

        With ``bucket_idx`` (int64 [N, slots], -1 for none) a message is sent once per bucket
        it names, bucket-major (:func:`hal.ops.ep_local.ep_pack`); without, the N messages are
        already in send order. Runs before the ranks agree, so its errors reach every peer.
        """
        frame = Frame(*fields)
        rows = frame.pack(message)
        if bucket_idx is None:
            return Outgoing(frame, None, None, rows)
        packed, src_idx, counts = ep_pack(rows, bucket_idx, num_buckets)
        return Outgoing(frame, src_idx, counts, packed)

    def exchange(
        self, outgoing: Outgoing, send_counts: Sequence[int], recv_counts: Sequence[int], phase: str, *, in_place: bool = False,
        keep_own: bool = False,
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """Send ``send_counts[r]`` prepared rows to rank r, receive ``recv_counts[r]`` from each rank
        r; returns each field of the received messages (contiguous, by source rank).

        ``in_place``: the caller consumes the results before this Buffer's next operation, so a
        transport may hand out views of its own buffers (shared memory does); here, fresh tensors.
        ``keep_own`` (with ``in_place``): the caller also takes a field as a tuple of segments
        standing for their concatenation, so a transport may leave the rows this rank sends itself
        where they are instead of copying them beside the received ones; here, one tensor."""
        assert isinstance(outgoing.rows, torch.Tensor)
        return outgoing.frame.unpack(self.all_to_all_rows(outgoing.rows, send_counts, recv_counts, phase))

    def all_to_all_rows(self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], phase: str) -> torch.Tensor:
        """Send ``rows`` (grouped by destination, ``send_counts[r]`` rows to rank r) and receive
        ``recv_counts[r]`` rows from each rank r, concatenated by source rank."""
        out = rows.new_empty((int(sum(recv_counts)),) + tuple(rows.shape[1:]))
        send, recv = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        self._run(lambda: dist.all_to_all_single(out, rows.contiguous(), recv, send, group=self.group, async_op=True), phase)
        self._confirm(phase)
        return out

    def _confirm(self, phase: str) -> None:
        """Succeed only if every rank completed this exchange within its deadline.

        A rank that stalled can find its payload exchange completing against work its peers
        already abandoned (gloo finishes queued operations in the background). Reporting success
        then would leave ranks disagreeing on what happened. So every rank states that it
        completed, in time, operation number N: a peer that gave up never joins, and this rank
        raises EPTimeoutError at its own deadline instead."""
        if self._remaining() <= 0:
            raise self._fail(phase, "the exchange completed after this rank's deadline; its peers have given up on it")
        numbers = self.all_gather_ints([self._operations], f"{phase} completion")
        if bool((numbers != self._operations).any()):
            raise self._fail(f"{phase} completion", f"ranks completed different operations: {numbers[:, 0].tolist()}")

    def _run(self, issue: Callable[[], dist.Work], phase: str) -> None:
        try:
            work = issue()
            if self.device.type == "cuda":
                self._poll(work, phase)
            elif not work.wait(timeout=datetime.timedelta(seconds=max(self._remaining(), 1e-3))):
                raise self._fail(phase, "")
        except EPTimeoutError:
            raise
        except Exception as exc:  # the library's own report of a dead peer, a timeout or a broken group
            raise self._fail(phase, f"{type(exc).__name__}: {exc}") from exc

    def _poll(self, work: dist.Work, phase: str) -> None:
        # A blocking NCCL wait would hold the CPU until the watchdog's (much longer) timeout.
        while not work.is_completed():
            if self._remaining() <= 0:
                raise self._fail(phase, "")
            time.sleep(_POLL_S)
        work.wait()

    def _remaining(self) -> float:
        return self.timeout_s - (time.monotonic() - self._started)

    def _fail(self, phase: str, cause: str) -> EPTimeoutError:
        error = EPTimeoutError(self._op, phase, self.rank, time.monotonic() - self._started, self.timeout_s, cause.strip())
        self.failure = f"{self._op} failed in its {phase} exchange"
        return error
