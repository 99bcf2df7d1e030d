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
Positional parameters follow DeepEP's order up to its first parameter not offered here; the
rest (``previous_event``, ``async_finish``, ``use_fp8``, ``out``...) are keyword-only, so a
DeepEP-only argument (``config``, ``bias``, ``round_scale``...) passed positionally fails loudly
instead of binding to another parameter.
Bad arguments on any rank raise on every rank, before any token moves; a rank that stalls or
dies makes the others raise :class:`~hal.ep.errors.EPTimeoutError` within ``timeout_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hal.ep.comm import group_device, resolve_timeout
from hal.ep.errors import EPError
from hal.ep.event import EventOverlap, capture
from hal.ep.transport import Transport, select_transport

__all__ = ["Buffer"]

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Buffer:
    """Expert-parallel dispatch and combine for one process group (DeepEP's ``Buffer``).

    Args:
        group: the expert-parallel group (default: the world group). NCCL groups take CUDA
            tensors, gloo groups CPU tensors.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode: DeepEP's buffer sizing, passed to a
            backend transport; the torch.distributed transport allocates per call and ignores them.
        timeout_s: bound on each operation; default ``HAL_EP_TIMEOUT_S`` or 100 s (DeepEP's).
        transport: ``"torch"``, a backend name, or None for ``HAL_EP_TRANSPORT`` / automatic
            (see :func:`hal.ep.transport.select_transport`).

    Attributes:
        group, rank, group_size: the group, this process's rank in it and its size.
        timeout_s: the resolved bound.
        transport: the object carrying the communication.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
        *, timeout_s: float | None = None, transport: str | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise EPError("hal.ep.Buffer: torch.distributed is not initialised; call torch.distributed.init_process_group first.")
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

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int, *, previous_event: EventOverlap | None = None, async_finish: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Where tokens go (:func:`hal.get_dispatch_layout` with ``num_ranks`` = the group size).

        Unlike DeepEP's, this call is collective (one small all_gather), so a bad ``topk_idx`` on
        one rank raises on every rank instead of leaving the others waiting in ``dispatch``.

        Args:
            topk_idx: int64 [num_tokens, num_topk], expert ids in [0, num_experts) or -1, distinct per row.
            num_experts: E, a multiple of the group size, the same on every rank.
            previous_event: waited for before starting. async_finish: accepted for DeepEP
                compatibility (the call completes before returning).

        Returns:
            ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R / 8] or None,
            num_tokens_per_expert int32 [E], is_token_in_rank bool [num_tokens, R], event)``.
        """
        _wait(previous_event)
        return self.transport.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(
        self, x: Tokens, handle: Any = None, num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1, num_worst_tokens: int = 0, *, previous_event: EventOverlap | None = None, async_finish: bool = False,
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
            previous_event: waited for before starting. async_finish: accepted for DeepEP compatibility.

        Returns:
            ``recv_x``: like x, the tokens this rank received, ordered by source rank then source
            token index; ``recv_topk_idx`` int64 [num_recv, num_topk] as local expert ids (global
            - rank * E / R), -1 for experts on other ranks; ``recv_topk_weights`` float32, 0 where
            the index is -1; ``num_recv_tokens_per_expert_list`` list[int] per local expert,
            aligned; ``handle`` (:class:`~hal.ep.handle.DispatchHandle`); ``event``. A cached
            dispatch returns ``(recv_x, None, None, None, None, event)``.
        """
        _wait(previous_event)
        return self.transport.dispatch(
            x, handle=handle, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, async_finish=async_finish,
        )

    def combine(
        self, x: torch.Tensor, handle: Any, topk_weights: torch.Tensor | None = None, *, previous_event: EventOverlap | None = None,
        async_finish: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Return each received row to its token's rank, which sums the copies (no expert weights).

        Args:
            x: bf16/fp16/fp32 [rows of the dispatch's recv_x, hidden], in recv_x's order.
            handle: the handle of the dispatch.
            topk_weights: float32 [rows, num_topk] or None; summed the same way.
            previous_event, async_finish: as in :meth:`dispatch`.

        Returns:
            ``(combined_x [num_tokens, hidden] dtype of x, summed in float32;
            combined_topk_weights float32 [num_tokens, num_topk] or None; event)``.
        """
        _wait(previous_event)
        return self.transport.combine(x, handle, topk_weights=topk_weights, async_finish=async_finish)

    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None, *, use_fp8: bool = True, async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Tokens, torch.Tensor, Any, EventOverlap, Callable[[], None]]:
        """Send every token to each of its experts' fixed slots (decode mode); see :mod:`hal.ep.low_latency`.

        Args:
            x: bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [num_tokens, num_topk], distinct experts per row or -1.
            num_max_dispatch_tokens_per_rank, num_experts: the same on every rank.
            cumulative_local_expert_recv_stats: int32 [num_local_experts], incremented by recv_count.
            use_fp8: cast per token per 128 channels before sending (hidden % 128 == 0).
            async_finish, return_recv_hook: accepted for DeepEP compatibility.

        Returns:
            ``recv_x``: bf16 [num_local_experts, R * max_tokens, hidden], or with use_fp8
            ``(float8_e4m3fn of that shape, float32 [num_local_experts, R * max_tokens, hidden / 128]
            column-major in the last two dimensions)``; ``recv_count`` int32 [num_local_experts];
            ``handle`` (:class:`~hal.ep.handle.LowLatencyHandle`); ``event``; ``hook``.
        """
        return self.transport.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, num_experts=num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats, use_fp8=use_fp8, async_finish=async_finish,
            return_recv_hook=return_recv_hook,
        )

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any, *, async_finish: bool = False,
        return_recv_hook: bool = False, out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
        """Return expert outputs and reduce them with the top-k weights.

        Args:
            x: bf16 [num_local_experts, R * max_tokens, hidden], expert outputs in recv_x's slots.
            topk_idx, topk_weights: int64 / float32 [num_tokens, num_topk], as dispatched (checked
                against every rank's handle).
            handle: the low-latency dispatch's handle.
            out: optional bf16 [num_tokens, hidden] written and returned.

        Returns:
            ``(combined_x bf16 [num_tokens, hidden] = sum_k w_k * expert_k(x), event, hook)``.
        """
        return self.transport.low_latency_combine(
            x, topk_idx, topk_weights, handle, async_finish=async_finish, return_recv_hook=return_recv_hook, out=out,
        )


def _wait(previous_event: EventOverlap | None) -> None:
    if previous_event is not None:
        previous_event.current_stream_wait()
