"""Expert-parallel exchanges between the GPUs of one host through CUDA IPC (DeepEP's intranode design).

DeepEP's intranode kernels give every rank a buffer on its own GPU, share it with the other ranks
of the host through CUDA IPC handles, and let each sender write tokens straight into the
receiver's buffer over NVLink (``csrc/kernels/intranode.cu``). :class:`IpcCommunicator` is that
data path, driven from the host with torch's own CUDA kernels:

- **Data plane on the GPUs.** Each rank allocates its receive area (``world`` slots, one per
  sender, :func:`area_bytes`) on its GPU with ``cudaMalloc`` (through cupy), takes a
  ``cudaIpcMemHandle_t`` of the allocation, and the ranks exchange the handles over the process
  group (:func:`encode_handle` / :func:`decode_handles`). Each rank opens its peers' handles
  (``cudaIpcOpenMemHandle``, peer access enabled lazily) and wraps every area as a torch CUDA
  tensor of its own device (a DLPack view over cupy's ``UnownedMemory``; ``torch.as_tensor`` would
  place a peer GPU's memory on that GPU, where torch refuses to mix it with this rank's tensors).
  A sender then gathers its rows straight into the receiver's slot with ``index_select(...,
  out=<the peer's slot>)``, and a combine whose receipt fits is reduced where it lies, exactly
  as :mod:`hal.ep.shm` does with host memory: the exchanges are :class:`~hal.ep.shm.ShmCommunicator`'s,
  only the slots differ (:class:`~hal.ep.shm.Slots`).
- **Control on the host.** The ranks share one host, so the control words of :mod:`hal.ep.shm`
  (a ``/dev/shm`` region without data slots) carry the barriers, the small all-gathers, the
  abort flags and the pids: a stalled rank fails the others at the deadline, a dead one at once,
  as on every transport.
- **Ordering.** Before signalling any barrier, a rank makes its GPU work complete: it records an
  event on each stream it used for the slots and polls ``event.query()`` within the operation's
  deadline. Its writes into peers' areas (and its reads of its own) are then done and visible;
  the kernels a peer launches after seeing the barrier are ordered after them.

What this is not: the barriers are host-signalled, so an operation synchronises the streams it
uses and **cannot be captured in a CUDA graph**. DeepEP's device-side counters (kernels that
spin on flags in the peers' buffers, graph capturable, its low-latency design) are **not built**
here. Every rank needs cupy (``pip install unihal[ipc]``, or ``cupy-cuda12x``); it is imported
only when a Buffer of an NCCL group is set up, never by ``import hal``.
"""

from __future__ import annotations

import json
import os
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hal.ep import shm
from hal.ep.comm import Communicator, group_device
from hal.ep.errors import EPError

__all__ = [
    "DEFAULT_AREA_BYTES", "HANDLE_BYTES", "INSTALL_HINT", "IpcCommunicator", "IpcSlots", "area_bytes", "connect", "cupy_found",
    "cupy_status", "decide", "decode_handles", "encode_error", "encode_handle", "local_facts", "wait_for",
]

DEFAULT_AREA_BYTES = 256 << 20  # per rank, on its GPU, when num_nvl_bytes is 0 (larger exchanges go in rounds)
HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t): CUDA_IPC_HANDLE_SIZE
INSTALL_HINT = "pip install unihal[ipc] (or cupy-cuda12x)"
_MAGIC = b"HALIPC1\0"
_FRAME = struct.Struct("<8siiQ")  # magic, rank, kind, area bytes; then the handle (or an error's text)
_HANDLE, _ERROR = 0, 1
_ALIGN = 64
_PROBE_S = 0.05


def area_bytes(num_nvl_bytes: int, world: int) -> int:
    """Bytes of each rank's receive area on its GPU: ``num_nvl_bytes`` when given (DeepEP's size of
    each rank's NVLink buffer), else :data:`DEFAULT_AREA_BYTES`; ``world`` slots of at least
    :data:`hal.ep.shm.MIN_SLOT` bytes each, so that any message row fits (exchanges go in rounds)."""
    requested = int(num_nvl_bytes) if num_nvl_bytes and num_nvl_bytes > 0 else DEFAULT_AREA_BYTES
    slot = max(requested // world, shm.MIN_SLOT) // _ALIGN * _ALIGN
    return slot * world


# --- cupy, imported lazily ---------------------------------------------------------------------


def cupy_found() -> bool:
    """Whether a ``cupy`` package is on the path (without importing it: for reports)."""
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec("cupy") is not None
    except (ImportError, ValueError):
        return False


def cupy_status() -> str:
    """'' when cupy imports, else why not (``"ModuleNotFoundError: ..."``)."""
    try:
        import cupy  # noqa: F401, PLC0415
    except Exception as exc:  # a missing package, or a cupy whose CUDA libraries fail to load
        return f"{type(exc).__name__}: {exc}"
    return ""


def _cupy() -> Any:
    import cupy  # noqa: PLC0415

    return cupy


# --- what each rank reports, and the rule every rank applies alike -----------------------------


def local_facts(device: torch.device, slot_bytes: int) -> dict[str, Any]:
    """This rank's part of the decision: its host, cupy, its GPU (PCI bus id) and the peer access
    from it to every other GPU it sees (a JSON-able dict; see :func:`decide`)."""
    facts: dict[str, Any] = {"host": shm._host_identity(), "cupy": cupy_status(), "slot_bytes": int(slot_bytes), "gpu": "", "peers": {}, "error": ""}
    if facts["cupy"]:
        return facts
    try:
        runtime = _cupy().cuda.runtime
        index = device.index if device.index is not None else torch.cuda.current_device()
        facts["gpu"] = runtime.deviceGetPCIBusId(index)
        for other in range(runtime.getDeviceCount()):
            if other != index:
                facts["peers"][runtime.deviceGetPCIBusId(other)] = bool(runtime.deviceCanAccessPeer(index, other))
    except Exception as exc:  # no driver, a device index out of range: reported, decided alike on every rank
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def decide(facts: Sequence[dict[str, Any]]) -> str | None:
    """Why the ranks cannot use CUDA IPC, or None: the same answer on every rank (all see all facts).

    The ranks must share one host (and its /dev/shm, for the control words), import cupy, agree
    on the slot size, and every pair of ranks on different GPUs must have peer access (each GPU
    visible to the other rank: an IPC mapping lives on the device that holds the memory). Ranks
    sharing one GPU need nothing more: IPC works within a device.
    """
    hosts = [f["host"] for f in facts]
    if len(set(hosts)) > 1:
        return f"the ranks are not on one host (hosts: {', '.join(sorted({h.split('|')[0] for h in hosts}))})"
    if "no /dev/shm" in hosts[0]:
        return "the ranks have no usable /dev/shm for the control words"
    missing = [r for r, f in enumerate(facts) if f["cupy"]]
    if missing:
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
        return f"cupy is not importable on {who} ({facts[missing[0]]['cupy']}): {INSTALL_HINT}"
    broken = [r for r, f in enumerate(facts) if f["error"]]
    if broken:
        return f"rank {broken[0]} could not query its GPUs through cupy ({facts[broken[0]]['error']})"
    sizes = sorted({f["slot_bytes"] for f in facts})
    if len(sizes) > 1:
        return f"the ranks disagree on the buffer size (slots of {', '.join(map(str, sizes))} bytes): pass one num_nvl_bytes on every rank"
    for a, mine in enumerate(facts):
        for b, theirs in enumerate(facts):
            if a == b or mine["gpu"] == theirs["gpu"]:
                continue
            if theirs["gpu"] not in mine["peers"]:
                return (f"rank {a} (GPU {mine['gpu']}) does not see rank {b}'s GPU {theirs['gpu']} "
                        f"(CUDA_VISIBLE_DEVICES): every rank must see the GPUs of the ranks it maps")
            if not mine["peers"][theirs["gpu"]]:
                return f"GPU {mine['gpu']} (rank {a}) has no peer access to GPU {theirs['gpu']} (rank {b})"
    return None


# --- the handle exchange ---------------------------------------------------------------------


def encode_handle(rank: int, area: int, handle: bytes) -> bytes:
    """Rank ``rank``'s frame: its receive area's size and the IPC handle of its allocation."""
    handle = bytes(handle)
    if len(handle) != HANDLE_BYTES:
        raise EPError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes, got {len(handle)}")
    return _FRAME.pack(_MAGIC, rank, _HANDLE, area) + handle


def encode_error(rank: int, message: str) -> bytes:
    """Rank ``rank``'s frame when it could not allocate or share its area."""
    return _FRAME.pack(_MAGIC, rank, _ERROR, 0) + message.encode()


def decode_handles(frames: Sequence[bytes], area: int) -> list[bytes]:
    """Every rank's handle, by rank, from the gathered frames (``frames[r]`` from rank r).

    Raises EPError naming the first rank whose frame is an error, malformed, out of order, or
    for an area of another size: every rank sees the same frames, so every rank raises alike.
    """
    handles = []
    for index, frame in enumerate(frames):
        frame = bytes(frame)
        if len(frame) < _FRAME.size:
            raise EPError(f"rank {index} sent a {len(frame)}-byte IPC frame (at least {_FRAME.size} expected)")
        magic, rank, kind, size = _FRAME.unpack_from(frame)
        body = frame[_FRAME.size :]
        if magic != _MAGIC or rank != index or kind not in (_HANDLE, _ERROR):
            raise EPError(f"frame {index} is not rank {index}'s IPC frame (magic {magic!r}, rank {rank}, kind {kind})")
        if kind == _ERROR:
            raise EPError(f"rank {index} could not share its buffer: {body.decode(errors='replace')}")
        if len(body) != HANDLE_BYTES:
            raise EPError(f"rank {index} sent a {len(body)}-byte IPC handle ({HANDLE_BYTES} expected)")
        if size != area:
            raise EPError(f"rank {index} shares a {size}-byte area, this rank expects {area}: the ranks disagree on num_nvl_bytes")
        handles.append(body)
    return handles


# --- the data plane ----------------------------------------------------------------------------


def wait_for(done: Callable[[], bool], remaining: Callable[[], float]) -> bool:
    """Poll ``done()`` until it holds (True) or ``remaining()`` reaches 0 (False): yield first,
    then sleep in growing steps (at most 1 ms)."""
    spins = 0
    while not done():
        if remaining() <= 0:
            return False
        spins += 1
        if spins < 64:
            os.sched_yield()
        else:
            time.sleep(min(1e-3, 2e-5 * 2 ** min(spins - 64, 6)))
    return True


class _Memory:
    """What one rank holds on its GPU: its own allocation and the peers' it opened."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.own = 0
        self.opened: list[int] = []

    def release(self) -> None:
        """Close the peers' handles and free this rank's allocation (idempotent, never raises:
        it also runs from a finalizer when a Buffer is dropped without ``destroy()``)."""
        own, opened, self.own, self.opened = self.own, self.opened, 0, []
        if not own and not opened:
            return
        try:
            cupy = _cupy()
            with cupy.cuda.Device(self.index):
                for pointer in opened:
                    try:
                        cupy.cuda.runtime.ipcCloseMemHandle(pointer)
                    except Exception:  # noqa: S110  (a context already torn down)
                        pass
                if own:
                    cupy.cuda.runtime.free(own)
        except Exception:  # noqa: S110  (interpreter exit)
            pass


def _wrap(pointer: int, nbytes: int, index: int) -> torch.Tensor:
    """A uint8 torch tensor of device ``cuda:index`` over ``nbytes`` at ``pointer`` (not owned)."""
    cupy = _cupy()
    with cupy.cuda.Device(index):
        memory = cupy.cuda.UnownedMemory(pointer, nbytes, None, index)
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        return torch.from_dlpack(array)


class IpcSlots(shm.Slots):
    """The receive areas of every rank as this rank sees them: its own allocation and its peers',
    opened through CUDA IPC, each a uint8 tensor on this rank's device.

    Attributes (besides :class:`~hal.ep.shm.Slots`'): device: this rank's GPU.
    """

    def __init__(self, areas: Sequence[torch.Tensor], slot_bytes: int, device: torch.device, memory: _Memory) -> None:
        super().__init__(areas, slot_bytes)
        self.device = device
        self._release = weakref.finalize(self, memory.release)
        self._release.atexit = False  # at exit the driver reclaims it; no CUDA calls during interpreter shutdown

    def close(self) -> None:
        super().close()
        self._release()


class IpcCommunicator(shm.ShmCommunicator):
    """:class:`~hal.ep.shm.ShmCommunicator`'s exchanges with the slots on the GPUs (see the module
    docstring): the control region stays in /dev/shm, the data plane is :class:`IpcSlots`."""

    transport = "ipc"
    medium = "CUDA IPC"

    def __init__(self, group: dist.ProcessGroup, timeout_s: float, region: shm.Region, slots: IpcSlots) -> None:
        super().__init__(group, timeout_s, region, slots)
        self.device = slots.device  # payloads live on the GPU whatever the group's collectives use
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _settle(self, phase: str) -> None:
        """Before signalling a barrier: every stream this rank used since the last one has finished
        (its writes into the peers' areas, its reads of its own), polled within the deadline."""
        stream = torch.cuda.current_stream(self.device)
        self._streams[stream.cuda_stream] = stream
        events = []
        for used in self._streams.values():
            event = torch.cuda.Event()
            event.record(used)
            events.append(event)
        if not wait_for(lambda: all(e.query() for e in events), self._remaining):
            raise self._fail(phase, "this rank's GPU work on the shared buffers did not finish in time")
        self._streams = {stream.cuda_stream: stream}  # the caller goes on using this one (in-place results)

    def _sizing_fix(self, slot_bytes: int) -> str:
        return f"create the Buffer with num_nvl_bytes >= {self.world * slot_bytes} (each rank's receive area on its GPU)"

    def close(self) -> None:
        try:
            for stream in self._streams.values():
                stream.synchronize()
        finally:
            self.slots.close()
            self.region.close()


def connect(group: dist.ProcessGroup, timeout_s: float, area: int, device: torch.device | None = None) -> IpcCommunicator | str:
    """Set up CUDA IPC buffers of ``area`` bytes per rank for ``group`` (collective, over the group's
    own collectives; ``device``: this rank's GPU, default the group's).

    Returns the communicator, or why the ranks cannot use CUDA IPC: the same reason on every rank
    (decided from every rank's facts), so that every rank falls back, or raises, alike.
    """
    device = device if device is not None else group_device(group)
    setup = Communicator(group, timeout_s)
    setup.begin("Buffer setup (CUDA IPC)")
    world, rank = setup.world, setup.rank
    slot_bytes = area // world
    mine = json.dumps(local_facts(device, slot_bytes)).encode()
    reason = decide([json.loads(f) for f in setup.all_gather_bytes(mine, "GPU facts")])
    if reason is not None:
        return reason
    region = shm.open_region(setup, 0)  # control words and mailboxes only
    if isinstance(region, str):
        return region
    memory, done = _Memory(device.index if device.index is not None else torch.cuda.current_device()), False
    try:
        cupy = _cupy()
        runtime = cupy.cuda.runtime
        try:
            with cupy.cuda.Device(memory.index):
                memory.own = runtime.malloc(area)
                frame = encode_handle(rank, area, runtime.ipcGetMemHandle(memory.own))
        except Exception as exc:  # out of memory, IPC unsupported: told to every rank
            frame = encode_error(rank, f"{type(exc).__name__}: {exc}")
        try:
            handles = decode_handles(setup.all_gather_bytes(frame, "IPC handles"), area)
        except EPError as exc:
            return str(exc)
        status, areas = b"", []
        try:
            with cupy.cuda.Device(memory.index):
                for peer, handle in enumerate(handles):
                    if peer == rank:
                        areas.append(_wrap(memory.own, area, memory.index))
                    else:
                        memory.opened.append(runtime.ipcOpenMemHandle(handle, runtime.cudaIpcMemLazyEnablePeerAccess))
                        areas.append(_wrap(memory.opened[-1], area, memory.index))
        except Exception as exc:
            status = f"{type(exc).__name__}: {exc}".encode()
        statuses = setup.all_gather_bytes(status, "IPC handles opened")
        failed = [r for r, s in enumerate(statuses) if s]
        if failed:
            return f"rank {failed[0]} could not open its peers' CUDA IPC handles: {statuses[failed[0]].decode()}"
        communicator = IpcCommunicator(group, timeout_s, region, IpcSlots(areas, slot_bytes, torch.device("cuda", memory.index), memory))
        done = True
        return communicator
    finally:
        if not done:
            memory.release()
            region.close()
