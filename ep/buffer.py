"""``hal.ep.Buffer``: DeepEP's ``deep_ep.Buffer`` interface on any torch.distributed group.

Usage is DeepEP's::

    buffer = hal.ep.Buffer(group)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \\
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle)

Every method is collective over the group: all ranks call the same methods in the same order.
Every parameter of DeepEP's legacy ``Buffer`` is accepted, in DeepEP's order; each docstring says
what an option means on torch.distributed (options that choose between DeepEP's CUDA kernels are
checked and recorded). hal's own options (``timeout_s``, ``transport``) are keyword-only.
Bad arguments on any rank raise on every rank, before any token moves; a rank that stalls or
dies makes the others raise :class:`~hal.ep.errors.EPTimeoutError` within ``timeout_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hal.ep.comm import group_device, resolve_timeout
from hal.ep.config import Config, combine_config, dispatch_config, low_latency_rdma_size_hint
from hal.ep.errors import EPError
from hal.ep.event import EventOverlap, capture
from hal.ep.handle import LowLatencyHandle
from hal.ep.transport import Transport, select_transport
from hal.errors import ArgumentError, OperatorNotSupportedError, ShapeError, ValueRangeError

__all__ = ["Buffer"]

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Buffer:
    """Expert-parallel dispatch and combine for one process group (DeepEP's ``Buffer``).

    Args:
        group: the expert-parallel group (default: the world group). NCCL groups take CUDA
            tensors, gloo groups CPU tensors.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode: DeepEP's buffer sizing, passed to a
            backend transport. ``num_nvl_bytes`` sizes the shared-memory region of the ``shm``
            transport (0: ``HAL_EP_SHM_BYTES`` or 1 GiB; larger exchanges go in rounds) and each
            rank's buffer on its GPU for the ``ipc`` transport (0: 256 MiB; likewise); the
            torch.distributed transport allocates per call and ignores them.
        timeout_s: bound on each operation; default ``HAL_EP_TIMEOUT_S`` or 100 s (DeepEP's).
        transport: ``"torch"``, ``"shm"``, ``"ipc"``, a backend name, or None for ``HAL_EP_TRANSPORT`` /
            automatic: ``shm`` when every rank of a gloo group is on this host, ``ipc`` (CUDA IPC,
            needs cupy; host-signalled, so not capturable in a CUDA graph) when every rank of an
            NCCL group is on this host and their GPUs have peer access, else ``torch``
            (see :func:`hal.ep.transport.select_transport`).

    Attributes:
        group, rank, group_size: the group, this process's rank in it and its size.
        timeout_s: the resolved bound.
        transport: the object carrying the communication.
    """

    num_sms: int = 20  # DeepEP's class-wide SM budget (set_num_sms); reported, tunes nothing here

    def __init__(
        self, group: dist.ProcessGroup | None = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
        num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
        explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None,
        *, timeout_s: float | None = None, transport: str | None = None,
    ) -> None:
        if group is None and comm is not None:
            raise ArgumentError("Buffer", "comm", "None (hal runs on torch.distributed groups)", "an mpi4py communicator",
                                "Create a torch.distributed group over the same ranks and pass it as group.")
        if not dist.is_initialized():
            raise EPError("hal.ep.Buffer: torch.distributed is not initialised; call torch.distributed.init_process_group first.")
        if isinstance(num_qps_per_rank, bool) or not isinstance(num_qps_per_rank, int) or num_qps_per_rank < 1:
            raise ValueRangeError("Buffer", "num_qps_per_rank", "a positive int", repr(num_qps_per_rank), "DeepEP's default is 24.")
        # RDMA queue pairs, NVLink use in low-latency mode and multi-node NVLink choose DeepEP's
        # NVSHMEM paths; torch.distributed picks its own transport, so they are recorded only.
        self.num_qps_per_rank, self.allow_nvlink_for_low_latency_mode, self.allow_mnnvl = num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl
        self.explicitly_destroy, self.enable_shrink = bool(explicitly_destroy), bool(enable_shrink)
        self._destroyed = False
        self._combine_buffers: dict[tuple[int, int, int], torch.Tensor] = {}
        self._local_buffers: dict[bool, torch.Tensor] = {}
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode = num_nvl_bytes, num_rdma_bytes, low_latency_mode
        self.timeout_s = resolve_timeout(timeout_s)
        options = {"num_nvl_bytes": num_nvl_bytes, "num_rdma_bytes": num_rdma_bytes, "low_latency_mode": low_latency_mode, "timeout_s": self.timeout_s}
        self.transport: Transport = select_transport(self.group, group_device(self.group), options, transport)

    def __repr__(self) -> str:
        return f"hal.ep.Buffer(rank {self.rank} of {self.group_size}, transport {self.transport.name!r}, timeout {self.timeout_s:g} s)"

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (DeepEP's ``Buffer.capture``); an empty one without CUDA."""
        return capture(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    # --- DeepEP's configuration and lifetime methods -------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        """DeepEP's build flag for its SM90 features, which its tests read to run the FP8 cases: hal
        serves FP8 dispatch on every device, so True."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count the recommended configs carry (even, as DeepEP requires)."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueRangeError("Buffer.set_num_sms", "new_num_sms", "a positive even int", repr(new_num_sms), "DeepEP pairs SMs into channels.")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch :class:`~hal.ep.config.Config` for ``num_ranks`` ranks."""
        return dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine :class:`~hal.ep.config.Config` for ``num_ranks`` ranks."""
        return combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        """Bytes DeepEP's low-latency mode needs in its RDMA buffer (bf16 sizing); hal allocates per call."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def get_comm_stream(self) -> Any:
        """The stream communication runs on: the current CUDA stream (the transport is synchronous), None on CPU."""
        self._alive("get_comm_stream")
        return torch.cuda.current_stream() if torch.cuda.is_available() and group_device(self.group).type == "cuda" else None

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        """A tensor over this rank's buffer of ``num_nvl_bytes`` (or ``num_rdma_bytes``), from element ``offset``.

        DeepEP exposes its registered NVLink/RDMA memory; here the buffer is ordinary device memory
        owned by the Buffer (the torch.distributed transport does not read it), kept for code that
        stages data through it.
        """
        self._alive("get_local_buffer_tensor")
        nbytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if use_rdma_buffer not in self._local_buffers:
            self._local_buffers[use_rdma_buffer] = torch.zeros(nbytes, dtype=torch.uint8, device=group_device(self.group))
        raw = self._local_buffers[use_rdma_buffer]
        item = torch.empty((), dtype=dtype).element_size()
        tensor = raw[: nbytes // item * item].view(dtype)[offset:]
        if size is None:
            return tensor
        size = torch.Size(size)
        if tensor.numel() < size.numel():
            raise ValueRangeError("Buffer.get_local_buffer_tensor", "size", f"at most {tensor.numel()} elements", f"{size.numel()}", "Allocate a larger buffer.")
        return tensor[: size.numel()].view(size)

    def destroy(self) -> None:
        """Release the Buffer (DeepEP requires ``explicitly_destroy=True``); any later call raises."""
        if not self.explicitly_destroy:
            raise ArgumentError("Buffer.destroy", "explicitly_destroy", "True at construction", "False",
                                "Construct with explicitly_destroy=True to release the Buffer yourself.")
        self._alive("destroy")
        self._combine_buffers.clear()
        self._local_buffers.clear()
        close = getattr(self.transport, "close", None)
        if close is not None:  # a backend's transport may hold nothing to release
            close()
        self._destroyed = True

    def _alive(self, method: str) -> None:
        if self._destroyed:
            raise EPError(f"hal.ep.Buffer.{method}: this Buffer was destroyed (Buffer.destroy()); create a new one.")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes its low-latency buffer after normal-mode use; hal's transport keeps no state
        between calls, so this only checks its arguments."""
        self._alive("clean_low_latency_buffer")
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueRangeError("Buffer.clean_low_latency_buffer", name, "a positive int", repr(value), "")

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        """The bf16 [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden] tensor
        to write expert outputs into before ``low_latency_combine(..., zero_copy=True)``."""
        self._alive("get_next_low_latency_combine_buffer")
        if not isinstance(handle, LowLatencyHandle):
            raise ArgumentError("Buffer.get_next_low_latency_combine_buffer", "handle", "the handle of a low_latency_dispatch", type(handle).__name__, "")
        shape = self._combine_buffer_shape(handle)
        if shape not in self._combine_buffers:
            self._combine_buffers[shape] = torch.zeros(shape, dtype=torch.bfloat16, device=group_device(self.group))
        return self._combine_buffers[shape]

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None, async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Where tokens go (:func:`hal.get_dispatch_layout` with ``num_ranks`` = the group size).

        Unlike DeepEP's, this call is collective (one small all_gather), so a bad ``topk_idx`` on
        one rank raises on every rank instead of leaving the others waiting in ``dispatch``.

        Args:
            topk_idx: int64 [num_tokens, num_topk], expert ids in [0, num_experts) or -1, distinct per row.
            num_experts: E, a multiple of the group size, the same on every rank.
            previous_event: waited for before starting. async_finish, allocate_on_comm_stream:
                accepted for DeepEP compatibility (the call completes before returning, on the
                current stream).

        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R / 8] or None,
            num_tokens_per_expert int32 [E], is_token_in_rank bool [num_tokens, R], event)``.
        """
        self._alive("get_dispatch_layout")
        _wait(previous_event)
        return self.transport.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(
        self, x: Tokens, handle: Any = None, num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config | None = None, previous_event: EventOverlap | None = None,
        async_finish: bool = False, allocate_on_comm_stream: bool = False,
    ) -> tuple[Tokens, torch.Tensor | None, torch.Tensor | None, list[int] | None, Any, EventOverlap]:
        """Send every token to each rank holding one of its experts (normal, high-throughput mode).

        Args:
            x: bf16/fp16/fp32 [num_tokens, hidden], or ``(float8_e4m3fn [num_tokens, hidden],
                float32 [num_tokens, hidden / 128])`` (scales of any strides). hidden, dtype and
                the presence of top-k arguments must agree across ranks.
            handle: a previous dispatch's handle for a cached dispatch (same layout, no top-k
                arguments); None otherwise.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                the layout from :meth:`get_dispatch_layout` (checked against each other and topk_idx).
            topk_idx: int64 [num_tokens, num_topk] or None; topk_weights: float32 of its shape or None.
            expert_alignment: round each local expert's received count up to this multiple.
            num_worst_tokens: if > 0, pad the received tensors to this many rows and return an
                empty count list (DeepEP's CPU-sync-free mode); must cover what the rank receives.
            config: a :class:`~hal.ep.config.Config` (checked; DeepEP's kernel chunking, nothing to tune here).
            previous_event: waited for before starting. async_finish, allocate_on_comm_stream:
                accepted for DeepEP compatibility.

        Returns:
            ``recv_x``: like x, the tokens this rank received, ordered by source rank then source
            token index; ``recv_topk_idx`` int64 [num_recv, num_topk] as local expert ids (global
            - rank * E / R), -1 for experts on other ranks; ``recv_topk_weights`` float32, 0 where
            the index is -1; ``num_recv_tokens_per_expert_list`` list[int] per local expert,
            aligned; ``handle`` (:class:`~hal.ep.handle.DispatchHandle`); ``event``. A cached
            dispatch returns ``(recv_x, None, None, None, None, event)``.
        """
        self._alive("dispatch")
        _check_config("Buffer.dispatch", config)
        _wait(previous_event)
        return self.transport.dispatch(
            x, handle=handle, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, async_finish=async_finish,
        )

    def combine(
        self, x: torch.Tensor, handle: Any, topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None, config: Config | None = None,
        previous_event: EventOverlap | None = None, async_finish: bool = False, allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Return each received row to its token's rank, which sums the copies (no expert weights).

        Args:
            x: bf16/fp16/fp32 [rows of the dispatch's recv_x, hidden], in recv_x's order.
            handle: the handle of the dispatch.
            topk_weights: float32 [rows, num_topk] or None; summed the same way.
            bias: None, one or two tensors of the output's shape and dtype, added to the sum in
                float32 before its single rounding (DeepEP's final bias).
            config, previous_event, async_finish, allocate_on_comm_stream: as in :meth:`dispatch`.

        Returns:
            ``(combined_x [num_tokens, hidden] dtype of x, summed in float32;
            combined_topk_weights float32 [num_tokens, num_topk] or None; event)``.
        """
        self._alive("combine")
        _check_config("Buffer.combine", config)
        _wait(previous_event)
        biases = tuple(b for b in ((bias,) if isinstance(bias, torch.Tensor) else tuple(bias or ())) if b is not None)
        if len(biases) > 2:
            raise ArgumentError("Buffer.combine", "bias", "None, a tensor or a pair of tensors", f"{len(biases)} tensors", "")
        extra = {"bias": biases} if biases else {}
        return _call(self.transport.combine, "combine", x, handle, topk_weights=topk_weights, async_finish=async_finish, **extra)

    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None, dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Tokens, torch.Tensor, Any, EventOverlap, Callable[[], None] | None]:
        """Send every token to each of its experts' fixed slots (decode mode); see :mod:`hal.ep.low_latency`.

        Args:
            x: bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [num_tokens, num_topk], distinct experts per row or -1.
            num_max_dispatch_tokens_per_rank, num_experts: the same on every rank.
            cumulative_local_expert_recv_stats: int32 [num_local_experts], incremented by recv_count.
            dispatch_wait_recv_cost_stats: int64 [num_ranks] (or [num_ranks, num_ranks]) or None: checked and left
                as is (DeepEP's per-source receive-wait clocks; one collective here has no per-source wait).
            use_fp8: cast per token per 128 channels before sending (hidden % 128 == 0).
            round_scale: scales rounded up to powers of two (UE8M0 values in float32).
            use_ue8m0: with round_scale, scales packed four exponents per int32:
                int32 [num_local_experts, R * max_tokens, hidden / 512], last two dimensions column-major.
            async_finish: accepted for DeepEP compatibility.
            return_recv_hook: return a callable that completes the receive (data has arrived when
                this transport returns, so it does nothing); without it the hook is None, as DeepEP's.

        Returns:
            ``recv_x``: bf16 [num_local_experts, R * max_tokens, hidden], or with use_fp8
            ``(float8_e4m3fn of that shape, float32 [num_local_experts, R * max_tokens, hidden / 128]
            column-major in the last two dimensions)``; ``recv_count`` int32 [num_local_experts];
            ``handle`` (:class:`~hal.ep.handle.LowLatencyHandle`); ``event``; ``hook``.
        """
        self._alive("low_latency_dispatch")
        op = "Buffer.low_latency_dispatch"
        if use_ue8m0 and not round_scale:
            raise ArgumentError(op, "use_ue8m0", "round_scale=True as well (DeepEP packs only rounded scales)", "round_scale=False", "Pass round_scale=True.")
        if (round_scale or use_ue8m0) and not use_fp8:
            raise ArgumentError(op, "round_scale", "use_fp8=True (scales exist only for FP8)", "use_fp8=False", "Pass use_fp8=True.")
        _check_cost_stats(op, "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, self.group_size)
        extra = {k: v for k, v in (("round_scale", round_scale), ("use_ue8m0", use_ue8m0)) if v}
        recv_x, recv_count, handle, event, hook = _call(
            self.transport.low_latency_dispatch, "low_latency_dispatch",
            x, topk_idx, num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, num_experts=num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats, use_fp8=use_fp8, async_finish=async_finish,
            return_recv_hook=return_recv_hook, **extra,
        )
        return recv_x, recv_count, handle, event, hook if return_recv_hook else None  # DeepEP: None unless asked for

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, use_logfmt: bool = False,
        zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False, out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Return expert outputs and reduce them with the top-k weights.

        Args:
            x: bf16 [num_local_experts, R * max_tokens, hidden], expert outputs in recv_x's slots.
            topk_idx, topk_weights: int64 / float32 [num_tokens, num_topk], as dispatched (checked
                against every rank's handle).
            handle: the low-latency dispatch's handle.
            use_logfmt: send expert outputs in LogFMT-10 (:mod:`hal.ops.logfmt`): per 128 channels
                whose magnitudes are all below 1, 10 bits per value instead of 16, decoded within
                ``LOGFMT_RELATIVE`` (about 2.2 %) of each value by the receiver.
            zero_copy: the expert outputs are read from :meth:`get_next_low_latency_combine_buffer`'s
                tensor, as DeepEP's kernel reads them; x gives the shape (the buffer itself, or a
                tensor of its shape).
            out: optional bf16 [num_tokens, hidden] written and returned.
            combine_wait_recv_cost_stats: as dispatch_wait_recv_cost_stats.

        Returns:
            ``(combined_x bf16 [num_tokens, hidden] = sum_k w_k * expert_k(x), event, hook)``; hook None
            unless ``return_recv_hook``.
        """
        self._alive("low_latency_combine")
        op = "Buffer.low_latency_combine"
        if zero_copy:
            x = self._zero_copy_source(op, x, handle)
        _check_cost_stats(op, "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, self.group_size)
        extra = {"use_logfmt": True} if use_logfmt else {}
        combined, event, hook = _call(
            self.transport.low_latency_combine, "low_latency_combine",
            x, topk_idx, topk_weights, handle, async_finish=async_finish, return_recv_hook=return_recv_hook, out=out, **extra,
        )
        return combined, event, hook if return_recv_hook else None

    def _combine_buffer_shape(self, handle: LowLatencyHandle) -> tuple[int, int, int]:
        """[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]: recv_x's slots."""
        return handle.num_experts // self.group_size, self.group_size * handle.num_max_dispatch_tokens_per_rank, handle.hidden

    def _zero_copy_source(self, op: str, x: object, handle: Any) -> torch.Tensor:
        """With ``zero_copy``, DeepEP's kernel reads the expert outputs from the buffer that
        :meth:`get_next_low_latency_combine_buffer` returned, and ``x`` only gives the shape: its
        tests write the buffer and pass another tensor of that shape."""
        if not isinstance(handle, LowLatencyHandle):
            raise ArgumentError(op, "handle", "the handle of a low_latency_dispatch", type(handle).__name__, "")
        shape = self._combine_buffer_shape(handle)
        buffer = self._combine_buffers.get(shape)
        if buffer is None:
            raise ArgumentError(op, "zero_copy", "a combine buffer from get_next_low_latency_combine_buffer(handle) holding the expert outputs",
                                "no buffer for this handle's shape", "Write the expert outputs into get_next_low_latency_combine_buffer(handle), or pass zero_copy=False.")
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ShapeError(op, "x", f"a tensor of the combine buffer's shape {list(shape)}", repr(getattr(x, "shape", type(x).__name__)),
                             "Pass the buffer itself or a tensor of its shape.")
        return buffer


def _check_config(op: str, config: object) -> None:
    if config is not None and not isinstance(config, Config):
        raise ArgumentError(op, "config", "a hal.ep.Config (deep_ep.Config) or None", type(config).__name__, "Use Buffer.get_dispatch_config(num_ranks).")


def _check_cost_stats(op: str, name: str, stats: object, ranks: int) -> None:
    # DeepEP's kernel asserts int64 [num_ranks] (one wait clock per source rank); its Python
    # docstring says [num_ranks, num_ranks]: both are taken.
    if stats is not None and not (isinstance(stats, torch.Tensor) and stats.dtype == torch.int64 and tuple(stats.shape) in ((ranks,), (ranks, ranks))):
        raise ArgumentError(op, name, f"an int64 tensor [{ranks}] (or [{ranks}, {ranks}]) or None", repr(getattr(stats, "shape", stats)), "")


def _call(method: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    """Call a transport method; a transport written before an option existed says so with a typed error."""
    try:
        return method(*args, **kwargs)
    except TypeError as exc:
        newer = [k for k in ("bias", "round_scale", "use_ue8m0", "use_logfmt") if k in kwargs and k in str(exc)]
        if newer:
            raise OperatorNotSupportedError(f"hal.ep.Buffer.{name}: the transport does not support {', '.join(newer)}; "
                                            f"select the torch transport (HAL_EP_TRANSPORT=torch) for it.") from exc
        raise


def _wait(previous_event: EventOverlap | None) -> None:
    if previous_event is not None:
        previous_event.current_stream_wait()
