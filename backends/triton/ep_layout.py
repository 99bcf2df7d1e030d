"""Expert-parallel dispatch layout (DeepEP's ``get_dispatch_layout``) in one Triton kernel.

Each program takes a block of tokens, marks the ranks (and nodes of 8 ranks) their top-k experts
live on, and adds its counts to the global per-rank / per-node / per-expert totals atomically.
Integer atomics make the result exact whatever the order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dispatch_layout"]

NVL_PEERS = 8


@triton.jit
def _layout_kernel(
    topk_ptr, per_rank_ptr, per_node_ptr, per_expert_ptr, in_rank_ptr,
    num_tokens, stride_t, experts_per_rank, num_ranks, stride_in_rank,
    TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, NODES: tl.constexpr, PEERS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    ranks = tl.arange(0, BLOCK_R)
    hits = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.int32)
    for k in tl.static_range(TOPK):
        expert = tl.load(topk_ptr + tokens * stride_t + k, mask=token_ok, other=-1)
        chosen = token_ok & (expert >= 0)
        tl.atomic_add(per_expert_ptr + expert, tl.full((BLOCK_T,), 1, tl.int32), mask=chosen)
        rank = tl.where(chosen, expert // experts_per_rank, -1)
        hits = tl.maximum(hits, (rank[:, None] == ranks[None, :]).to(tl.int32))
    rank_ok = ranks < num_ranks
    tl.store(in_rank_ptr + tokens[:, None] * stride_in_rank + ranks[None, :], hits.to(tl.uint8), mask=token_ok[:, None] & rank_ok[None, :])
    tl.atomic_add(per_rank_ptr + ranks, tl.sum(hits, axis=0), mask=rank_ok)
    if NODES > 0:
        node_hits = tl.max(tl.reshape(hits, (BLOCK_T, BLOCK_R // PEERS, PEERS)), axis=2)
        nodes = tl.arange(0, BLOCK_R // PEERS)
        tl.atomic_add(per_node_ptr + nodes, tl.sum(node_hits, axis=0), mask=nodes < NODES)


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Shapes and meaning as ``hal.ops.ep.get_dispatch_layout`` (arguments already validated)."""
    topk_idx = topk_idx.contiguous()
    num_tokens, topk = topk_idx.shape
    device = topk_idx.device
    per_rank = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    nodes = num_ranks // NVL_PEERS if num_ranks > NVL_PEERS else 0
    per_node = torch.zeros(max(nodes, 1), dtype=torch.int32, device=device)
    per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
    if num_tokens and topk:
        block_r = max(triton.next_power_of_2(num_ranks), NVL_PEERS)
        block_t = max(16, min(128, 4096 // block_r))
        _layout_kernel[(triton.cdiv(num_tokens, block_t),)](
            topk_idx, per_rank, per_node, per_expert, in_rank.view(torch.uint8),
            num_tokens, topk_idx.stride(0), num_experts // num_ranks, num_ranks, in_rank.stride(0),
            TOPK=topk, BLOCK_T=block_t, BLOCK_R=block_r, NODES=nodes, PEERS=NVL_PEERS,
        )
    return per_rank, per_node if nodes else None, per_expert, in_rank
