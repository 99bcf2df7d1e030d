"""Communication handles: what a dispatch leaves for the matching combine (and cached dispatch).

Both are tuples of DeepEP's fields, so code that unpacks or indexes DeepEP handles keeps working:
DeepEP's intranode handle is six fields (its tests read ``handle[0]``, its buffer unpacks six;
the channel fields are DeepEP's values for one channel), and the low-latency handle is DeepEP's
five ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)`` (its
tests read ``handle[0][i]`` and ``handle[1][i]`` per local expert; its buffer unpacks five). Each handle also identifies its dispatch (``dispatch_id``, ``owner``) so that a
handle passed to the wrong call, or different handles passed on different ranks, is rejected on
every rank instead of exchanging mismatched payloads.
"""

from __future__ import annotations

import torch

__all__ = ["DispatchHandle", "LowLatencyHandle"]


class DispatchHandle(tuple):
    """Returned by ``Buffer.dispatch``; drives ``Buffer.combine`` and cached ``Buffer.dispatch``.

    A tuple of DeepEP's six intranode fields, ``(rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head)``, so code that unpacks
    or indexes DeepEP's handle keeps working. DeepEP splits each rank's tokens over channels (one
    per pair of SMs); hal moves no channels, and its channel fields are DeepEP's values for one
    channel. The combine's own bookkeeping and the dispatch's identity ride along as attributes.

    Fields (int32 and bool tensors on the tokens' device; R ranks):
        rank_prefix_matrix: int32 [R, R]: entry [i, j] is the number of tokens ranks 0..i send to
            rank j, so rank j's received tokens from rank i are rows ``[M[i-1, j], M[i, j])`` of
            its ``recv_x``.
        channel_prefix_matrix: int32 [R, 1]: per destination rank, the running count of this
            rank's tokens sent to it up to the end of each channel (one channel: all of them).
        recv_channel_prefix_matrix: int32 [R, 1]: per source rank, where each channel's tokens
            start within that rank's rows of ``recv_x`` (one channel: 0).
        recv_src_idx: int32 [num_recv_tokens]: each received token's index on its source rank.
        is_token_in_rank: bool [num_tokens, R], this rank's send map (as passed to dispatch).
        send_head: int32 [num_tokens, R]: token t's place among this rank's tokens sent to rank r
            (its place in the channel's queue), -1 where it is not sent there.

    Attributes:
        send_src_idx: int32 [sum of is_token_in_rank]: the token of each row this rank sent,
            destination rank first, then token index (the order rows come back in combine).
        num_recv_rows: rows of ``recv_x``: num_recv_tokens, or ``num_worst_tokens`` when padded.
        dispatch_id: the operation number of the dispatch, the same on every rank.
        owner: the id of the Buffer that made the handle.
    """

    send_src_idx: torch.Tensor
    num_recv_rows: int
    dispatch_id: int
    owner: int

    def __new__(cls, rank_prefix_matrix: torch.Tensor, channel_prefix_matrix: torch.Tensor, recv_channel_prefix_matrix: torch.Tensor,
                recv_src_idx: torch.Tensor, is_token_in_rank: torch.Tensor, send_head: torch.Tensor, send_src_idx: torch.Tensor,
                num_recv_rows: int, dispatch_id: int, owner: int) -> DispatchHandle:
        handle = super().__new__(cls, (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head))
        handle.send_src_idx, handle.num_recv_rows, handle.dispatch_id, handle.owner = send_src_idx, num_recv_rows, dispatch_id, owner
        return handle

    @classmethod
    def one_channel(cls, rank_prefix_matrix: torch.Tensor, recv_src_idx: torch.Tensor, is_token_in_rank: torch.Tensor, send_src_idx: torch.Tensor,
                    num_recv_rows: int, dispatch_id: int, owner: int) -> DispatchHandle:
        """The handle of a dispatch that sent ``is_token_in_rank`` and received ``recv_src_idx``, with
        DeepEP's channel fields for one channel derived from the send map."""
        sent = is_token_in_rank.to(torch.int32)
        place = sent.cumsum(dim=0, dtype=torch.int32) - 1  # the running tail of each destination's queue
        send_head = torch.where(is_token_in_rank, place, torch.full_like(place, -1))
        channel_prefix = sent.sum(dim=0, dtype=torch.int32).view(-1, 1)
        recv_channel_prefix = torch.zeros_like(channel_prefix)
        return cls(rank_prefix_matrix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank, send_head, send_src_idx,
                   num_recv_rows, dispatch_id, owner)

    def __getnewargs__(self) -> tuple:  # pickling rebuilds it with its attributes
        return (*self, self.send_src_idx, self.num_recv_rows, self.dispatch_id, self.owner)

    def __repr__(self) -> str:
        return (f"DispatchHandle(num_ranks={self[0].shape[0]}, num_tokens={self[4].shape[0]}, num_recv_tokens={self.num_recv_tokens}, "
                f"num_recv_rows={self.num_recv_rows}, dispatch_id={self.dispatch_id}, owner={self.owner})")

    rank_prefix_matrix = property(lambda self: self[0])
    channel_prefix_matrix = property(lambda self: self[1])
    recv_channel_prefix_matrix = property(lambda self: self[2])
    recv_src_idx = property(lambda self: self[3])
    is_token_in_rank = property(lambda self: self[4])
    send_head = property(lambda self: self[5])

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
