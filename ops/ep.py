"""Expert-parallel dispatch layout (DeepEP's ``get_dispatch_layout``): the single-process contract.

Experts are split evenly over ranks: rank r owns experts ``[r * E / R, (r + 1) * E / R)``. A
token goes to every rank that owns at least one of its top-k experts. DeepEP's RDMA ranks group
8 NVLink peers (one node); across nodes (R > 8) a token is counted once per node it reaches.
The multi-process dispatch/combine builds on this layout.
"""

from __future__ import annotations

import torch

from hal.checks import expect_in_range, expect_int, expect_tensor, values_within
from hal.dispatch import call
from hal.errors import ValueRangeError
from hal.operator import declare

__all__ = ["EP_DISPATCH_LAYOUT", "NVL_PEERS_PER_NODE", "get_dispatch_layout", "dispatch_layout_reference"]

NVL_PEERS_PER_NODE = 8

EP_DISPATCH_LAYOUT = declare(
    "ep_dispatch_layout", "hal_ep_dispatch_layout", "ep", "Tokens per rank/node/expert and token-to-rank map (get_dispatch_layout)"
)

Layout = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor]


MAX_EXPERTS = 1 << 24


def dispatch_layout_reference(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> Layout:
    """Reference for :func:`get_dispatch_layout` (arguments already validated)."""
    num_tokens = topk_idx.shape[0]
    device = topk_idx.device
    experts_per_rank = num_experts // num_ranks
    selected = topk_idx >= 0
    num_tokens_per_expert = torch.bincount(topk_idx[selected], minlength=num_experts).to(torch.int32)
    rank_of = torch.where(selected, topk_idx // experts_per_rank, num_ranks)  # num_ranks: a dummy column
    hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)
    hits.scatter_(1, rank_of, True)
    is_token_in_rank = hits[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    num_tokens_per_rdma_rank = None
    if num_ranks > NVL_PEERS_PER_NODE:
        per_node = is_token_in_rank.view(num_tokens, num_ranks // NVL_PEERS_PER_NODE, NVL_PEERS_PER_NODE).any(dim=2)
        num_tokens_per_rdma_rank = per_node.sum(dim=0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> Layout:
    """Count where tokens go before an expert-parallel dispatch.

    Args:
        topk_idx: int64 [num_tokens, num_topk]; expert ids in [0, num_experts), -1 for no expert.
        num_experts: total experts E, a multiple of num_ranks.
        num_ranks: ranks R in the expert-parallel group; when R > 8 it must be a multiple of 8
            (nodes of 8 NVLink peers).

    Returns:
        ``num_tokens_per_rank`` int32 [R]: tokens with at least one expert on each rank.
        ``num_tokens_per_rdma_rank`` int32 [R // 8]: tokens reaching each node, or None when R <= 8.
        ``num_tokens_per_expert`` int32 [E]: (token, k) selections of each expert.
        ``is_token_in_rank`` bool [num_tokens, R].
    """
    op = "get_dispatch_layout"
    if torch.compiler.is_compiling():
        per_rank, per_node, per_expert, in_rank = torch.ops.hal.get_dispatch_layout(topk_idx, num_experts, num_ranks)
        return per_rank, (per_node if num_ranks > NVL_PEERS_PER_NODE else None), per_expert, in_rank
    expect_tensor(op, "topk_idx", topk_idx, dtypes=torch.int64, shape=(None, None), dims=("num_tokens", "num_topk"))
    expect_int(op, "num_ranks", num_ranks, minimum=1)
    expect_int(op, "num_experts", num_experts, minimum=1)
    if num_experts > MAX_EXPERTS:
        raise ValueRangeError(
            op, "num_experts", f"at most {MAX_EXPERTS} experts (int32 counters per expert)", str(num_experts),
            "Pass the number of experts of the model (DeepSeek-V3: 256).",
        )
    if num_experts % num_ranks:
        raise ValueRangeError(
            op, "num_experts", f"a multiple of num_ranks={num_ranks}", str(num_experts), "Experts are split evenly over ranks."
        )
    if num_ranks > NVL_PEERS_PER_NODE and num_ranks % NVL_PEERS_PER_NODE:
        raise ValueRangeError(
            op, "num_ranks", f"a multiple of {NVL_PEERS_PER_NODE} when above {NVL_PEERS_PER_NODE} (whole nodes)",
            str(num_ranks), "Use whole nodes of 8 ranks.",
        )
    if not values_within(topk_idx, -1, num_experts):
        expect_in_range(
            op, "topk_idx", topk_idx, -1, num_experts, what=f"expert ids (-1 for none; num_experts={num_experts})",
            fix="Route only to existing experts, or -1 for an unused slot.",
        )
    return call(EP_DISPATCH_LAYOUT, "topk_idx", topk_idx.device, topk_idx=topk_idx, num_experts=num_experts, num_ranks=num_ranks)
