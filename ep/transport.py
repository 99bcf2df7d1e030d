"""Who moves the tokens: the default torch.distributed transport, or one a backend supplies.

A transport carries all of a Buffer's communication. Built in:

- ``torch`` (:class:`TorchTransport`): torch.distributed collectives (gloo on CPU, NCCL on CUDA)
  around the local operators ``ep_pack`` / ``ep_unpack`` / ``ep_combine_reduce``, which the
  selected hal backend runs. The path across machines.
- ``shm`` (:class:`ShmTransport`): CPU ranks of one host exchange through one shared-memory
  region (:mod:`hal.ep.shm`), senders writing straight into receivers' slots; the same protocol
  (agreement, deadlines) on top. Chosen automatically for gloo groups whose ranks share a host.
- ``ipc`` (:class:`IpcTransport`): GPU ranks of one host exchange through buffers on their GPUs
  shared with CUDA IPC (:mod:`hal.ep.ipc`, needs cupy), senders writing straight into receivers'
  slots, the shm transport's control words on the host. Chosen automatically for NCCL groups
  whose ranks share a host, import cupy and whose GPUs have peer access (or are one). Host
  signalled: not capturable in a CUDA graph.

A backend may instead answer the ``hal_ep_transport`` hook with its own object (DeepEP's kernels
when ``deep_ep`` is importable, say); :func:`select_transport` says which one a Buffer gets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from hal import registry
from hal.ep import ipc, low_latency, normal, shm
from hal.ep.comm import Communicator
from hal.ep.errors import EPError
from hal.ep.event import EventOverlap
from hal.ep.handle import DispatchHandle, LowLatencyHandle
from hal.errors import BackendUnavailableError, OperatorNotSupportedError, UnknownBackendError

__all__ = ["ENV_TRANSPORT", "TORCH", "SHM", "IPC", "Transport", "TorchTransport", "ShmTransport", "IpcTransport", "select_transport", "plan"]

ENV_TRANSPORT = "HAL_EP_TRANSPORT"
TORCH = "torch"
SHM = "shm"
IPC = "ipc"
HOOK = "hal_ep_transport"
_log = logging.getLogger("hal.ep")

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Transport(Protocol):
    """What a Buffer delegates to. Arguments arrive as the user passed them to the Buffer
    (DeepEP's names); results are DeepEP's tuples. ``name`` is shown in ``repr(buffer)``."""

    name: str

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]: ...

    def dispatch(
        self, x: Tokens, *, handle: Any, num_tokens_per_rank: torch.Tensor | None, num_tokens_per_rdma_rank: torch.Tensor | None,
        is_token_in_rank: torch.Tensor | None, num_tokens_per_expert: torch.Tensor | None, topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None, expert_alignment: int, num_worst_tokens: int, async_finish: bool,
    ) -> tuple[Tokens, torch.Tensor | None, torch.Tensor | None, list[int] | None, Any, EventOverlap]: ...

    def combine(
        self, x: torch.Tensor, handle: Any, *, topk_weights: torch.Tensor | None, async_finish: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]: ...

    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, *, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None, use_fp8: bool, async_finish: bool, return_recv_hook: bool,
    ) -> tuple[Tokens, torch.Tensor, Any, EventOverlap, Callable[[], None]]: ...

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, *, async_finish: bool,
        return_recv_hook: bool, out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]: ...


class TorchTransport:
    """torch.distributed collectives around hal's local EP operators.

    Every call completes its exchange before returning, so ``async_finish`` and
    ``return_recv_hook`` change nothing: the returned event is already satisfied and the hook is
    a no-op. Each call is bounded by ``timeout_s`` (:mod:`hal.ep.comm`).
    """

    name = TORCH

    def __init__(self, group: dist.ProcessGroup, timeout_s: float, comm: Communicator | None = None) -> None:
        self.comm = comm if comm is not None else Communicator(group, timeout_s)

    def close(self) -> None:
        """Release what the transport holds (nothing for torch.distributed)."""

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        return normal.dispatch_layout(self.comm, topk_idx, num_experts)

    def dispatch(
        self, x: Tokens, *, handle: DispatchHandle | None, num_tokens_per_rank: torch.Tensor | None,
        num_tokens_per_rdma_rank: torch.Tensor | None, is_token_in_rank: torch.Tensor | None, num_tokens_per_expert: torch.Tensor | None,
        topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None, expert_alignment: int, num_worst_tokens: int, async_finish: bool,
    ) -> tuple[Tokens, torch.Tensor | None, torch.Tensor | None, list[int] | None, DispatchHandle | None, EventOverlap]:
        if handle is not None:
            return normal.cached_dispatch(self.comm, x, handle, topk_idx, topk_weights)
        return normal.dispatch(
            self.comm, x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
        )

    def combine(
        self, x: torch.Tensor, handle: DispatchHandle, *, topk_weights: torch.Tensor | None, async_finish: bool,
        bias: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        return normal.combine(self.comm, x, handle, topk_weights, bias)

    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, *, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None, use_fp8: bool, async_finish: bool, return_recv_hook: bool,
        round_scale: bool = False, use_ue8m0: bool = False,
    ) -> tuple[Tokens, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None]]:
        return low_latency.dispatch(
            self.comm, x, topk_idx, num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, num_experts=num_experts,
            use_fp8=use_fp8, cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats, round_scale=round_scale, use_ue8m0=use_ue8m0,
        )

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle, *, async_finish: bool,
        return_recv_hook: bool, out: torch.Tensor | None, use_logfmt: bool = False,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
        return low_latency.combine(self.comm, x, topk_idx, topk_weights, handle, out, use_logfmt=use_logfmt)


class ShmTransport(TorchTransport):
    """:class:`TorchTransport`'s protocol over a shared-memory region (:mod:`hal.ep.shm`): CPU ranks
    of one host, no sockets on the data path. Every call completes before returning, as there."""

    name = SHM

    def __init__(self, comm: shm.ShmCommunicator) -> None:
        super().__init__(comm.group, comm.timeout_s, comm)

    def close(self) -> None:
        assert isinstance(self.comm, shm.ShmCommunicator)
        self.comm.close()


class IpcTransport(ShmTransport):
    """:class:`TorchTransport`'s protocol over buffers on the GPUs of one host, shared through CUDA
    IPC (:mod:`hal.ep.ipc`). Every call completes before returning (it synchronises the streams it
    uses), so it cannot be captured in a CUDA graph."""

    name = IPC


def _shared_memory(group: dist.ProcessGroup, device: torch.device, options: dict[str, Any], forced: bool) -> Transport | None:
    """The shm transport for a gloo group whose ranks share a host; None (auto) or an error (forced) otherwise."""
    if device.type != "cpu" or dist.get_backend(group) != "gloo":
        if forced:
            raise OperatorNotSupportedError(
                f"EP transport '{SHM}': shared memory carries CPU tensors of gloo groups; this group is "
                f"{dist.get_backend(group)} on {device.type}. Use '{TORCH}'."
            )
        return None
    result = shm.connect(group, options["timeout_s"], shm.data_bytes(int(options.get("num_nvl_bytes") or 0), dist.get_world_size(group)))
    if isinstance(result, str):
        if forced:
            raise BackendUnavailableError(f"EP transport '{SHM}': {result}. Use '{TORCH}' across hosts.")
        _log.info("hal.ep: shared-memory transport not used (%s); using torch.distributed", result)
        return None
    return ShmTransport(result)


def _cuda_ipc(group: dist.ProcessGroup, device: torch.device, options: dict[str, Any], forced: bool) -> Transport | None:
    """The ipc transport for CUDA ranks of one host; None (auto) or an error (forced) otherwise."""
    if device.type != "cuda":
        if forced:
            raise OperatorNotSupportedError(
                f"EP transport '{IPC}' is not available for this group: {IPC} carries CUDA tensors; CPU groups use {SHM} "
                f"(this group is {dist.get_backend(group)} on {device.type}). Use '{SHM}' or '{TORCH}'."
            )
        return None
    world = dist.get_world_size(group)
    result = ipc.connect(group, options["timeout_s"], ipc.area_bytes(int(options.get("num_nvl_bytes") or 0), world), device)
    if isinstance(result, str):
        if forced:
            raise BackendUnavailableError(f"EP transport '{IPC}': {result}. Use '{TORCH}' (NCCL) otherwise.")
        _log.info("hal.ep: CUDA IPC transport not used (%s); using torch.distributed", result)
        return None
    return IpcTransport(result)


def select_transport(group: dist.ProcessGroup, device: torch.device, options: dict[str, Any], choice: str | None) -> Transport:
    """The transport for a Buffer.

    Args:
        group, device: the Buffer's process group and the device its tensors live on.
        options: the Buffer's ``num_nvl_bytes``, ``num_rdma_bytes``, ``low_latency_mode``, ``timeout_s``
            (resolved), passed to backends' ``hal_ep_transport``.
        choice: ``"torch"``, ``"shm"``, ``"ipc"``, a backend name (that backend must supply one), or
            None / ``"auto"``: ``HAL_EP_TRANSPORT`` if set, else the first available backend, by
            priority, whose hook answers for this device, else ``"shm"`` for a gloo group whose
            ranks share a host, else ``"ipc"`` for CUDA ranks of one host that import cupy and
            whose GPUs have peer access (or share one), else ``"torch"``. Every rank must choose
            alike (the shm and ipc setups are collective; each decides from every rank's facts).
    """
    choice = choice or os.environ.get(ENV_TRANSPORT, "").strip() or "auto"
    if choice == TORCH:
        return TorchTransport(group, options["timeout_s"])
    if choice == SHM:
        transport = _shared_memory(group, device, options, forced=True)
        assert transport is not None
        return transport
    if choice == IPC:
        transport = _cuda_ipc(group, device, options, forced=True)
        assert transport is not None
        return transport
    known = registry.backends()
    if choice != "auto":
        backend = known.get(choice)
        if backend is None:
            raise UnknownBackendError(f"EP transport {choice!r}: no such backend; choose '{TORCH}' or one of {', '.join(sorted(known))}.")
        if not backend.available:
            raise BackendUnavailableError(f"EP transport {choice!r}: backend unavailable: {backend.availability().reason}")
        transport = _ask(backend, group, device, options)
        if transport is None:
            raise OperatorNotSupportedError(f"EP transport {choice!r}: the backend supplies no transport for {device.type} groups; use '{TORCH}'.")
        return transport
    for backend in sorted(known.values(), key=lambda b: (-b.priority, b.name)):
        if backend.available and backend.accepts_device(device.type):
            transport = _ask(backend, group, device, options)
            if transport is not None:
                return transport
    if device.type == "cuda":
        return _cuda_ipc(group, device, options, forced=False) or TorchTransport(group, options["timeout_s"])
    return _shared_memory(group, device, options, forced=False) or TorchTransport(group, options["timeout_s"])


def _ask(backend: registry.Backend, group: dist.ProcessGroup, device: torch.device, options: dict[str, Any]) -> Transport | None:
    hook = backend.impl(HOOK)
    if hook is None:
        return None
    transport = hook(group=group, device=device, options=dict(options))
    if transport is not None and not isinstance(transport, Transport):
        raise EPError(f"backend '{backend.name}': hal_ep_transport returned {type(transport).__name__}, which lacks the Transport methods")
    return transport


def plan() -> dict[str, Any]:
    """What :func:`select_transport` would give a Buffer on this machine, without creating anything
    (for ``hal backends``): the forced choice, backends that offer a transport, the rule, room in
    /dev/shm (``shm``) and whether cupy is there for CUDA IPC (``ipc``; found, not imported)."""
    forced = os.environ.get(ENV_TRANSPORT, "").strip() or None
    offering = sorted(b.name for b in registry.backends().values() if b.available and b.implements(HOOK))
    try:
        stat = os.statvfs(shm.SHM_DIR)
        room = f"{shm.SHM_DIR}: {stat.f_bavail * stat.f_frsize / 2**30:.1f} GiB free"
    except OSError:
        room = f"{shm.SHM_DIR}: not available"
    if ipc.cupy_found():
        cuda = f"{IPC} if the ranks share a host and each pair of their GPUs has peer access (or they share one), else {TORCH}"
        cupy = f"cupy found: CUDA ranks of one host can use {IPC}"
    else:
        cuda = TORCH
        cupy = f"cupy not found: {IPC} (CUDA IPC between the GPUs of one host) needs it: {ipc.INSTALL_HINT}"
    return {
        "forced": forced, "backends": offering, "shm": room, "ipc": cupy,
        "rule": {
            "cpu (gloo), ranks on one host": forced or (f"a backend's ({', '.join(offering)}) if it answers, else {SHM}" if offering else SHM),
            "cpu (gloo), ranks on several hosts": forced or TORCH,
            "cuda (nccl)": forced or (f"a backend's ({', '.join(offering)}) if it answers, else {cuda}" if offering else cuda),
        },
    }
