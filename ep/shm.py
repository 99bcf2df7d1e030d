"""Expert-parallel exchanges through shared memory: CPU ranks of one host, no sockets on the data path.

DeepEP's intranode path maps every peer's buffer and writes tokens straight into the receiver's
buffer, with counters for flow control (NVLink through CUDA IPC; ``csrc/kernels/intranode.cu``).
:class:`ShmCommunicator` is that design for processes on one host:

- **One region per group.** Rank 0 creates a file in ``/dev/shm`` (named ``hal-ep-<pid>-<random>``),
  every rank maps it, and rank 0 unlinks the name as soon as every rank has mapped it. The memory
  lives as long as one mapping does, so nothing is left in ``/dev/shm`` even when a rank is killed;
  a name left by a crash inside the short window before unlinking is swept at the next creation
  (its creator's pid is gone).
- **Control words.** Each rank's arrival counter (its epoch), pid and abort flag. A barrier raises
  this rank's counter to the next epoch and waits until every counter reaches it, bounded by the
  operation's deadline. A rank that gives up raises its abort flag, which its peers see at once;
  a peer whose process is gone (``/proc/<pid>``) is reported at once too.
- **Mailboxes.** Two per rank (by epoch parity) of :data:`MAILBOX` bytes, for the agreement header
  and the other small all-gathers. A parity is rewritten two barriers later, after every rank
  has passed the barrier that follows its read.
- **Data.** ``R x R`` slots (sender -> receiver) of ``data_bytes / R^2`` bytes, one region per
  message field in each. A sender gathers its rows straight into the receiver's slot (one pass,
  no framing); the receiver copies them out into its result (one pass); a rank's rows to itself
  skip the slots (one pass, straight into the result). An exchange larger than a slot goes in
  rounds, as DeepEP's chunked receive buffer does.
- **In place.** A receiver's ``R`` slots are adjacent: its receive area. When every rank's whole
  receipt fits its area and the caller consumes the rows at once (combine's reduction), each
  sender writes its rows straight to their final rows there, by source rank, and the receiver
  reduces them where they lie: no copy out.

The agreement protocol (:mod:`hal.ep.agreement`) runs unchanged on top: only the transport of the
bytes differs from :class:`~hal.ep.comm.Communicator`, whose gloo collectives set the region up.

The data plane is pluggable (:class:`Slots`): :mod:`hal.ep.ipc` keeps this region's control words
and mailboxes for GPU ranks of one host and swaps the slots for buffers on the GPUs, shared
through CUDA IPC.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import socket
import threading
import time
from array import array
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from hal.ep.comm import Communicator, Outgoing
from hal.ep.errors import EPError, EPTimeoutError
from hal.ep.message import Field, Frame
from hal.ops.ep_local import send_order

__all__ = ["SHM_DIR", "PREFIX", "DEFAULT_BYTES", "ENV_BYTES", "MAILBOX", "MIN_SLOT", "Region", "ShmCommunicator", "Slots", "connect", "data_bytes", "leftover_segments", "open_region"]

SHM_DIR = "/dev/shm"
PREFIX = "hal-ep-"
DEFAULT_BYTES = 1 << 30  # per group; pages are only touched as used. 4096 DeepSeek-V3 tokens from 4 ranks (~215 MB) fit one receive area
ENV_BYTES = "HAL_EP_SHM_BYTES"
MAILBOX = 64 << 10
MIN_SLOT = 1 << 20  # a DeepSeek-V3 token (7168 x fp32 plus routing) is ~29 KB: 35 of them per round
_ALIGN = 64
_PAGE = 4096
_HEAD = 4  # control words: magic, world, data bytes, reserved
_PER_RANK = 4  # per rank: epoch, pid, abort, reserved
_EPOCH, _PID, _ABORT = 0, 1, 2
_MAGIC = 0x48414C53484D  # "HALSHM"
_PROBE_S = 0.05  # how often a waiting rank checks that the ranks it waits for still exist
_SWEEP_AGE_S = 60.0  # a leftover younger than this may be a live creation in progress
_fence_lock = threading.Lock()


def _fence() -> None:
    # A lock round trip is a full memory barrier on every architecture CPython runs on: slot
    # data written before it is visible to a peer that sees the counter written after it.
    with _fence_lock:
        pass


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


def data_bytes(num_nvl_bytes: int, world: int) -> int:
    """The data area of a group's region: ``num_nvl_bytes`` (DeepEP's NVLink buffer size) when
    given, else ``HAL_EP_SHM_BYTES``, else :data:`DEFAULT_BYTES`; at least :data:`MIN_SLOT` per
    sender -> receiver slot, so that any message row fits (exchanges go in rounds anyway)."""
    return max(_requested_bytes(num_nvl_bytes), MIN_SLOT * world * world)


def _requested_bytes(num_nvl_bytes: int) -> int:
    if num_nvl_bytes > 0:
        return int(num_nvl_bytes)
    text = os.environ.get(ENV_BYTES, "").strip()
    try:
        value = int(float(text)) if text else DEFAULT_BYTES
    except ValueError:
        raise EPError(f"{ENV_BYTES}={text!r} is not a number of bytes") from None
    if value <= 0:
        raise EPError(f"{ENV_BYTES}={text!r}: the shared-memory region needs a positive size")
    return value


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True  # cannot tell: assume alive and let the deadline decide


def leftover_segments() -> list[str]:
    """Names of hal's EP segments in /dev/shm (none should outlive a Buffer's setup)."""
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _sweep() -> None:
    """Unlink segments whose creator is gone (a crash between creating and unlinking)."""
    for name in leftover_segments():
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            path = os.path.join(SHM_DIR, name)
            if not _alive(pid) and time.time() - os.stat(path).st_mtime > _SWEEP_AGE_S:
                os.unlink(path)
        except (ValueError, OSError):
            continue


class Slots:
    """The data plane as one rank sees it: each receiver's receive area of ``world`` adjacent
    slots (sender -> receiver, ``slot_bytes`` each, by sender). Shared memory gives every rank
    views of one region (:class:`Region`); CUDA IPC (:mod:`hal.ep.ipc`) gives each rank its own
    area on its GPU and its peers' areas mapped from theirs. The exchanges only use this API.

    Attributes:
        world: ranks in the group.
        slot_bytes: bytes of one sender -> receiver slot (a multiple of 64).
        areas: uint8 [world * slot_bytes] per receiver, where this rank reads and writes them.
    """

    def __init__(self, areas: Sequence[torch.Tensor], slot_bytes: int) -> None:
        self.world = len(areas)
        self.slot_bytes = slot_bytes
        self.areas = list(areas)

    def slot(self, sender: int, receiver: int, offset: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """``rows`` rows shaped like ``like``'s (2-d) at ``offset`` bytes into slot sender -> receiver."""
        begin = sender * self.slot_bytes + offset
        width = like.shape[1] * like.element_size()
        return self.areas[receiver][begin : begin + rows * width].view(like.dtype).view(rows, like.shape[1])

    def area(self, receiver: int, offset: int, first: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Rows ``first : first + rows`` shaped like ``like``'s (2-d) of the field region at ``offset``
        bytes into ``receiver``'s receive area (its ``world`` slots, which are adjacent)."""
        width = like.shape[1] * like.element_size()
        begin = offset + first * width
        return self.areas[receiver][begin : begin + rows * width].view(like.dtype).view(rows, like.shape[1])

    def close(self) -> None:
        self.areas = []


class Region:
    """One group's mapped region: control words, mailboxes and the R x R data slots.

    Attributes:
        world: ranks in the group.
        slot_bytes: bytes of one sender -> receiver slot (a multiple of 64; 0 for a region of
            control words and mailboxes only, whose data plane lives elsewhere).
        words: the control words (a memoryview of int64).
        data: uint8 [world * world * slot_bytes], the slots, receiver-major (each receiver's
            area is its ``world`` adjacent slots, by sender).
        slots: the data plane over ``data`` (:class:`Slots`).
    """

    def __init__(self, path: str, world: int, data_size: int, *, create: bool) -> None:
        self.world = world
        control = _round_up(8 * (_HEAD + _PER_RANK * world), _PAGE)
        self._mailboxes = control
        data_offset = _round_up(control + 2 * world * MAILBOX, _PAGE)
        self.slot_bytes = data_size // (world * world) // _ALIGN * _ALIGN
        total = data_offset + self.slot_bytes * world * world
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            elif os.fstat(fd).st_size != total:
                raise EPError(f"{path} holds {os.fstat(fd).st_size} bytes, this rank expects {total}: the ranks disagree on num_nvl_bytes")
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self.words = self._view[:control].cast("q")
        count = self.slot_bytes * world * world
        self.data = torch.frombuffer(self._map, dtype=torch.uint8, offset=data_offset, count=count) if count else torch.empty(0, dtype=torch.uint8)
        area = world * self.slot_bytes
        self.slots = Slots([self.data[r * area : (r + 1) * area] for r in range(world)], self.slot_bytes)
        if create:
            self.words[0], self.words[1], self.words[2] = _MAGIC, world, self.slot_bytes
        elif (self.words[0], self.words[1], self.words[2]) != (_MAGIC, world, self.slot_bytes):
            raise EPError(f"{path} is not this group's region (header {list(self.words[:3])})")

    def word(self, rank: int, field: int) -> int:
        return _HEAD + _PER_RANK * rank + field

    def mailbox(self, parity: int, rank: int) -> memoryview:
        begin = self._mailboxes + (parity * self.world + rank) * MAILBOX
        return self._view[begin : begin + MAILBOX]

    def slot(self, sender: int, receiver: int, offset: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """As :meth:`Slots.slot`."""
        return self.slots.slot(sender, receiver, offset, rows, like)

    def area(self, receiver: int, offset: int, first: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """As :meth:`Slots.area`."""
        return self.slots.area(receiver, offset, first, rows, like)

    def close(self) -> None:
        self.slots.close()
        self.data = torch.empty(0, dtype=torch.uint8)
        self.words.release()
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a tensor view is still alive somewhere; the mapping goes with it
            pass


def _host_identity() -> str:
    """Equal on ranks that can share /dev/shm (the mapping itself is the final test)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
    except OSError:
        boot_id = "?"
    usable = os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)
    return f"{socket.gethostname()}|{boot_id}|{'shm' if usable else 'no /dev/shm'}"


def _words(tensor: torch.Tensor, field: Field) -> torch.Tensor:
    """A field's tensor ``[N, *field.shape]`` as 2-d words (the widest dtype its row bytes allow)."""
    rows = tensor.shape[0]
    flat = tensor.reshape(rows, math.prod(field.shape))
    raw = flat.contiguous().view(torch.uint8) if flat.numel() else torch.empty(rows, field.nbytes, dtype=torch.uint8, device=tensor.device)
    for width, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if field.nbytes % width == 0 and raw.data_ptr() % width == 0:
            return raw.view(dtype)
    return raw


class ShmCommunicator(Communicator):
    """:class:`~hal.ep.comm.Communicator`'s exchanges through a shared :class:`Region` (see the module docstring).

    The data plane is pluggable: ``slots`` (default: the region's own) is where the exchanges
    write and read rows; the region always carries the control words and mailboxes. A data plane
    whose writes complete asynchronously (a GPU's) overrides :meth:`_settle`, which runs before
    this rank signals any barrier.
    """

    transport = "shm"
    medium = "shared-memory"  # named in errors

    def __init__(self, group: dist.ProcessGroup, timeout_s: float, region: Region, slots: Slots | None = None) -> None:
        super().__init__(group, timeout_s)
        self.region = region
        self.slots = slots if slots is not None else region.slots
        self._epoch = 0
        self.last_exchange = ""  # how the latest exchange ran: "in place" or "<n> rounds" (for tests and debugging)

    def close(self) -> None:
        self.region.close()

    # --- barriers and small gathers --------------------------------------------------------

    def _barrier(self, phase: str) -> None:
        """Arrive at the next epoch and wait for every rank, within the operation's deadline."""
        self._settle(phase)
        self._epoch += 1
        epoch, words, region = self._epoch, self.region.words, self.region
        _fence()
        words[region.word(self.rank, _EPOCH)] = epoch
        spins, probe_at = 0, time.monotonic() + _PROBE_S
        while True:
            lagging = [r for r in range(self.world) if words[region.word(r, _EPOCH)] < epoch]
            if not lagging:
                _fence()
                return
            aborted = [r for r in range(self.world) if words[region.word(r, _ABORT)]]
            if aborted:
                raise self._fail(phase, f"rank {aborted[0]} gave up this operation")
            if self._remaining() <= 0:
                raise self._fail(phase, f"rank{'s' if len(lagging) > 1 else ''} {', '.join(map(str, lagging))} did not arrive")
            if time.monotonic() >= probe_at:
                dead = [r for r in lagging if not _alive(words[region.word(r, _PID)])]
                if dead:
                    raise self._fail(phase, f"rank {dead[0]} (pid {words[region.word(dead[0], _PID)]}) exited")
                probe_at = time.monotonic() + _PROBE_S
            spins += 1
            # Yield first (a peer on this core gets to run), then sleep in growing steps.
            if spins < 256:
                os.sched_yield()
            else:
                time.sleep(min(1e-3, 2e-5 * 2 ** min(spins - 256, 6)))

    def _settle(self, phase: str) -> None:
        """Make this rank's writes into the slots (and its reads of them) complete before it
        signals a barrier. Host memory: the barrier's fence suffices."""

    def _fail(self, phase: str, cause: str) -> EPTimeoutError:
        self.region.words[self.region.word(self.rank, _ABORT)] = 1
        return super()._fail(phase, cause)

    def _gather(self, data: bytes, phase: str) -> list[bytes]:
        """Every rank's ``data`` through the mailboxes, in rounds of a mailbox each."""
        chunk = MAILBOX - 8
        received = [bytearray() for _ in range(self.world)]
        offset = 0
        while True:
            parity = (self._epoch + 1) % 2
            box, piece = self.region.mailbox(parity, self.rank), data[offset : offset + chunk]
            box[:8] = len(data).to_bytes(8, "little")
            box[8 : 8 + len(piece)] = piece
            self._barrier(phase)
            longest = 0
            for rank in range(self.world):
                theirs = self.region.mailbox(parity, rank)
                total = int.from_bytes(theirs[:8], "little")
                received[rank] += theirs[8 : 8 + max(min(chunk, total - offset), 0)]
                longest = max(longest, total)
            offset += chunk
            if offset >= longest:
                return [bytes(b) for b in received]

    def all_gather_ints(self, values: Sequence[int], phase: str) -> torch.Tensor:
        gathered = self._gather(array("q", [int(v) for v in values]).tobytes(), phase)
        return torch.stack([torch.frombuffer(bytearray(b), dtype=torch.int64) if b else torch.empty(0, dtype=torch.int64) for b in gathered])

    def all_gather_bytes(self, data: bytes, phase: str) -> list[bytes]:
        return self._gather(bytes(data), phase)

    # --- payloads ------------------------------------------------------------------------------

    def prepare_rows(
        self, fields: Sequence[Field], message: Mapping[str, torch.Tensor], bucket_idx: torch.Tensor | None = None, num_buckets: int = 0
    ) -> Outgoing:
        """As :meth:`Communicator.prepare_rows`, without moving a row: the exchange gathers each
        field straight into the receivers' slots."""
        frame = Frame(*fields)
        tensors = {field.name: _words(message[field.name], field) for field in fields}
        if bucket_idx is None:
            return Outgoing(frame, None, None, tensors)
        src_idx, counts = send_order(bucket_idx, num_buckets)
        return Outgoing(frame, src_idx.to(torch.int32), counts, tensors)

    def _sizing_fix(self, slot_bytes: int) -> str:
        """How to make every slot hold ``slot_bytes``."""
        return f"create the Buffer with num_nvl_bytes >= {self.world ** 2 * slot_bytes} (or set {ENV_BYTES})"

    def _layout(self, tensors: Sequence[torch.Tensor], space: int) -> tuple[int, list[int]]:
        """Rows that fit ``space`` bytes, and each field's byte offset in it (one region per field)."""
        row_bytes = [t.shape[1] * t.element_size() for t in tensors]
        capacity = (space - _ALIGN * len(tensors)) // max(sum(row_bytes), 1)
        offsets, at = [], 0
        for width in row_bytes:
            offsets.append(at)
            at += _round_up(capacity * width, _ALIGN)
        return capacity, offsets

    @staticmethod
    def _put(tensor: torch.Tensor, order: torch.Tensor | None, begin: int, rows: int, into: torch.Tensor) -> None:
        """Rows ``begin : begin + rows`` of the send order into ``into`` (a gather when an order is given)."""
        if order is None:
            into.copy_(tensor[begin : begin + rows])
        else:
            torch.index_select(tensor, 0, order[begin : begin + rows], out=into)

    def exchange(
        self, outgoing: Outgoing, send_counts: Sequence[int], recv_counts: Sequence[int], phase: str, *, in_place: bool = False,
        keep_own: bool = False,
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """As :meth:`Communicator.exchange`. With ``in_place``, when every rank's whole receipt fits
        its receive area, the senders write straight to the rows' final places there and the
        results are views of this rank's area: valid until this Buffer's next operation, for a
        caller that consumes them at once (combine's reduction). With ``keep_own`` too, and rows
        sent in their own order (no gather), the rows this rank sends itself are not copied into
        its area: each field is then ``(rows from lower ranks, own rows, rows from higher ranks)``,
        views of the area and of the outgoing tensor (a third of a 2-rank combine's copying).
        Otherwise, and without ``in_place``, the results are this rank's own tensors."""
        assert isinstance(outgoing.rows, dict)
        fields = outgoing.frame.fields
        tensors = [outgoing.rows[f.name] for f in fields]
        send, recv = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        capacity, offsets = self._layout(tensors, self.slots.slot_bytes)
        if capacity < 1:  # the fields are agreed facts: every rank raises this alike, before any barrier
            row = sum(t.shape[1] * t.element_size() for t in tensors)
            raise EPError(
                f"{self._op}: a message of {row} bytes does not fit a {self.medium} slot of {self.slots.slot_bytes} bytes; "
                f"{self._sizing_fix(row + _ALIGN * len(tensors))}."
            )
        me = self.rank
        if send[me] != recv[me]:  # both come from one agreed table; a mismatch is a bug, never data to trust
            raise EPError(f"{self._op}: rank {me} would send itself {send[me]} rows but expects {recv[me]}")
        peers = [r for r in range(self.world) if r != me]
        area_rows, area_offsets = self._layout(tensors, self.slots.slot_bytes * self.world)
        need = max([-(-c // capacity) for r in peers for c in (send[r], recv[r])] + [0])
        # One gather settles the plan on every rank alike: rounds, whether each receipt fits a
        # receive area whole, and (for direct writes) where each sender's rows go in each area.
        table = self.all_gather_ints([need, sum(recv)] + send, f"{phase} plan")
        order = outgoing.src_idx
        send_at = [sum(send[:r]) for r in range(self.world)]
        if in_place and int(table[:, 1].max()) <= area_rows:
            self.last_exchange = "in place"
            own = keep_own and order is None and send[me] > 0
            return self._direct(tensors, fields, order, send, send_at, table[:, 2:], area_offsets, phase, own)
        self.last_exchange = f"{int(table[:, 0].max())} rounds"
        return self._rounds(tensors, fields, order, send, recv, send_at, int(table[:, 0].max()), capacity, offsets, phase)

    def _direct(
        self, tensors: list[torch.Tensor], fields: Sequence[Field], order: torch.Tensor | None, send: list[int], send_at: list[int],
        sends: torch.Tensor, offsets: list[int], phase: str, keep_own: bool = False,
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        """One round: each sender writes its rows to their final rows in each receiver's area
        (``sends[s, r]`` rows from s to r, by source rank), this rank's own rows included unless
        ``keep_own`` (then they stay in the outgoing tensors and each field comes in three segments)."""
        me = self.rank
        at = torch.cumsum(sends, dim=0) - sends  # [sender, receiver]: first row of the sender's rows in the receiver's area
        for peer in [*(r for r in range(self.world) if r != me), me]:  # peers first: their reduction waits on them
            if send[peer] and not (peer == me and keep_own):
                first = int(at[me, peer])
                for tensor, offset in zip(tensors, offsets):
                    self._put(tensor, order, send_at[peer], send[peer], self.slots.area(peer, offset, first, send[peer], tensor))
        self._barrier(phase)
        total = int(sends[:, me].sum())

        def field(f: Field, t: torch.Tensor, offset: int, first: int, rows: int) -> torch.Tensor:
            return self.slots.area(me, offset, first, rows, t).view(torch.uint8).view(f.dtype).view((rows,) + f.shape)

        # No barrier after the reads: the next exchange begins with a gather, whose barrier no rank
        # passes before every rank has finished with this one.
        if not keep_own:
            return {f.name: field(f, t, offset, 0, total) for f, t, offset in zip(fields, tensors, offsets)}
        own_at, own = int(at[me, me]), send[me]
        return {
            f.name: (
                field(f, t, offset, 0, own_at),
                t[send_at[me] : send_at[me] + own].view(torch.uint8).view(f.dtype).view((own,) + f.shape),
                field(f, t, offset, own_at + own, total - own_at - own),
            )
            for f, t, offset in zip(fields, tensors, offsets)
        }

    def _rounds(
        self, tensors: list[torch.Tensor], fields: Sequence[Field], order: torch.Tensor | None, send: list[int], recv: list[int],
        send_at: list[int], rounds: int, capacity: int, offsets: list[int], phase: str,
    ) -> dict[str, torch.Tensor]:
        """Into this rank's own results, through the sender -> receiver slots in rounds of ``capacity`` rows."""
        me = self.rank
        peers = [r for r in range(self.world) if r != me]
        recv_at = [sum(recv[:r]) for r in range(self.world)]
        out = [t.new_empty((sum(recv), t.shape[1])) for t in tensors]
        # This rank's rows to itself never pass through a slot: one copy, straight into the result.
        if recv[me]:
            for tensor, result in zip(tensors, out):
                self._put(tensor, order, send_at[me], recv[me], result[recv_at[me] : recv_at[me] + recv[me]])
        for index in range(rounds):
            first = index * capacity
            for peer in peers:  # write: straight into each receiver's slot
                rows = min(capacity, send[peer] - first)
                if rows > 0:
                    for tensor, offset in zip(tensors, offsets):
                        self._put(tensor, order, send_at[peer] + first, rows, self.slots.slot(me, peer, offset, rows, tensor))
            self._barrier(phase)
            for peer in peers:  # read: each sender's slot into this rank's result
                rows = min(capacity, recv[peer] - first)
                if rows > 0:
                    at = recv_at[peer] + first
                    for tensor, result, offset in zip(tensors, out, offsets):
                        result[at : at + rows].copy_(self.slots.slot(peer, me, offset, rows, tensor))
            if index + 1 < rounds:  # slots are reused: every rank has read its own (after the last round, the next gather orders it)
                self._barrier(f"{phase} (read)")
        total = sum(recv)
        return {f.name: o.view(torch.uint8).view(f.dtype).view((total,) + f.shape) for f, o in zip(fields, out)}

    def all_to_all_rows(self, rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], phase: str) -> torch.Tensor:
        field = Field("rows", rows.dtype, tuple(rows.shape[1:]))
        return self.exchange(self.prepare_rows([field], {"rows": rows}), send_counts, recv_counts, phase)["rows"]


def connect(group: dist.ProcessGroup, timeout_s: float, size: int) -> ShmCommunicator | str:
    """Set up a shared region for ``group`` (collective, over the group's own collectives).

    Returns the communicator, or why the group cannot share memory: the same reason on every
    rank (ranks on different hosts, no usable /dev/shm, too little space, a rank that cannot map
    the file), so that every rank falls back, or raises, alike.
    """
    setup = Communicator(group, timeout_s)
    setup.begin("Buffer setup (shared memory)")
    region = open_region(setup, size)
    if isinstance(region, str):
        return region
    return ShmCommunicator(group, timeout_s, region)


def open_region(setup: Communicator, size: int) -> Region | str:
    """Create and map one region of ``size`` data bytes on every rank of ``setup``'s group
    (collective, over ``setup``'s collectives, inside an operation it has begun); rank 0 unlinks
    its name once every rank has mapped it.

    Returns the mapped region, or why the ranks cannot share one: the same reason on every rank.
    ``size`` 0 maps the control words and mailboxes alone (a data plane elsewhere, as CUDA IPC's).
    """
    identities = setup.all_gather_bytes(_host_identity().encode(), "host identity")
    if len(set(identities)) > 1 or b"no /dev/shm" in identities[0]:
        hosts = sorted({i.decode().split("|")[0] for i in identities})
        return f"the ranks do not share one /dev/shm (hosts: {', '.join(hosts)})"
    world, rank = setup.world, setup.rank
    created = b""
    if rank == 0:
        try:
            _sweep()
            path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
            needed = size + 2 * world * MAILBOX + 2 * _PAGE
            free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
            if free < needed:
                raise EPError(f"{SHM_DIR} has {free} bytes free, the region needs {needed}: pass a smaller num_nvl_bytes "
                              f"(or {ENV_BYTES}), or enlarge {SHM_DIR} (docker: --shm-size)")
            region = Region(path, world, size, create=True)
            created = json.dumps({"path": path}).encode()
        except (OSError, EPError) as exc:
            created = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
    reply = json.loads(setup.all_gather_bytes(created, "region name")[0].decode())
    if "error" in reply:
        return f"rank 0 could not create the region: {reply['error']}"
    status = b""
    try:
        if rank != 0:
            region = Region(reply["path"], world, size, create=False)
        region.words[region.word(rank, _PID)] = os.getpid()
    except (OSError, EPError) as exc:
        status = f"{type(exc).__name__}: {exc}".encode()
    try:
        statuses = setup.all_gather_bytes(status, "region mapped")
    finally:
        if rank == 0:  # every rank has mapped it (or failed to): the name is no longer needed
            try:
                os.unlink(reply["path"])
            except FileNotFoundError:
                pass
    failed = [r for r, s in enumerate(statuses) if s]
    if failed:
        if not status:
            region.close()
        return f"rank {failed[0]} could not map {reply['path']}: {statuses[failed[0]].decode()}"
    return region
