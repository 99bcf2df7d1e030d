"""Communication handles: what a dispatch leaves for the matching combine (and cached dispatch).

Both are tuples led by DeepEP's fields, so code that indexes DeepEP handles keeps working:
DeepEP's intranode handle starts with ``rank_prefix_matrix`` (its tests read ``handle[0]``; the
other fields differ, since they are its kernels' channel bookkeeping), and the low-latency handle
is exactly DeepEP's five ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
num_experts)`` (its tests read ``handle[0][i]`` and ``handle[1][i]`` per local expert; its buffer
unpacks five). Each handle also identifies its dispatch (``dispatch_id``, ``owner``) so that a
handle passed to the wrong call, or different handles passed on different ranks, is rejected on
every rank instead of exchanging mismatched payloads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DispatchHandle", "LowLatencyHandle"]


class DispatchHandle(NamedTuple):
    """Returned by ``Buffer.dispatch``; drives ``Buffer.combine`` and cached ``Buffer.dispatch``.

    Attributes:
        rank_prefix_matrix: int32 [R, R] on the tokens' device: entry [i, j] is the number of
            tokens ranks 0..i send to rank j (DeepEP's meaning), so rank j's received tokens from
            rank i are rows ``[M[i-1, j], M[i, j])`` of its ``recv_x``.
        recv_src_idx: int32 [num_recv_tokens]: each received token's index on its source rank.
        is_token_in_rank: bool [num_tokens, R], this rank's send map (as passed to dispatch).
        send_src_idx: int32 [sum of is_token_in_rank]: the token of each row this rank sent,
            destination rank first, then token index (the order rows come back in combine).
        num_recv_rows: rows of ``recv_x``: num_recv_tokens, or ``num_worst_tokens`` when padded.
        dispatch_id: the operation number of the dispatch, the same on every rank.
        owner: the id of the Buffer that made the handle.
    """

    rank_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_src_idx: torch.Tensor
    num_recv_rows: int
    dispatch_id: int
    owner: int

    @property
    def num_recv_tokens(self) -> int:
        return int(self.recv_src_idx.shape[0])


class LowLatencyHandle(tuple):
    """Returned by ``Buffer.low_latency_dispatch``; drives ``Buffer.low_latency_combine``.

    A tuple of DeepEP's five fields, ``(src_info, layout_range, num_max_dispatch_tokens_per_rank,
    hidden, num_experts)``, so code that unpacks DeepEP's handle keeps working; the dispatch's
    identity (``dispatch_id``, ``owner``) rides along as attributes.

    Attributes:
        src_info: int32 [num_local_experts, R * max_tokens]: for each valid slot of ``recv_x``,
            the token's index on its source rank; -1 in unused slots.
        layout_range: int64 [num_local_experts, R]: ``(begin << 32) | count``, the slots of each
            local expert holding the tokens from each source rank (DeepEP's packing).
        num_max_dispatch_tokens_per_rank, hidden, num_experts: as dispatched.
        dispatch_id, owner: as in :class:`DispatchHandle`.
    """

    dispatch_id: int
    owner: int

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, num_max_dispatch_tokens_per_rank: int, hidden: int,
                num_experts: int, dispatch_id: int, owner: int) -> LowLatencyHandle:
        handle = super().__new__(cls, (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts))
        handle.dispatch_id, handle.owner = dispatch_id, owner
        return handle

    def __getnewargs__(self) -> tuple:  # pickling rebuilds it with its identity
        return (*self, self.dispatch_id, self.owner)

    def __repr__(self) -> str:
        return (f"LowLatencyHandle(num_max_dispatch_tokens_per_rank={self[2]}, hidden={self[3]}, num_experts={self[4]}, "
                f"dispatch_id={self.dispatch_id}, owner={self.owner})")

    src_info = property(lambda self: self[0])
    layout_range = property(lambda self: self[1])
    num_max_dispatch_tokens_per_rank = property(lambda self: self[2])
    hidden = property(lambda self: self[3])
    num_experts = property(lambda self: self[4])

    def counts(self) -> torch.Tensor:
        """int64 [num_local_experts, R]: tokens each local expert holds from each source rank."""
        return self.layout_range & 0xFFFFFFFF
