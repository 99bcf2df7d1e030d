"""``hal.get_dispatch_layout`` (DeepEP's dispatch layout) against an independent Python-loop count,
and its argument checks."""

from __future__ import annotations

import re

import pytest
import torch

import hal

PEERS_PER_NODE = 8


def layout_by_loops(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Count with plain Python loops over tokens and top-k slots."""
    experts_per_rank = num_experts // num_ranks
    rows = topk_idx.tolist()
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in rows]
    for t, row in enumerate(rows):
        for e in row:
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // experts_per_rank] = True
        for r in range(num_ranks):
            per_rank[r] += in_rank[t][r]
    per_node = None
    if num_ranks > PEERS_PER_NODE:
        per_node = [0] * (num_ranks // PEERS_PER_NODE)
        for flags in in_rank:
            for node in range(len(per_node)):
                per_node[node] += any(flags[node * PEERS_PER_NODE : (node + 1) * PEERS_PER_NODE])
    return per_rank, per_node, per_expert, in_rank


def random_topk(num_tokens: int, num_topk: int, num_experts: int, num_ranks: int, seed: int, *, idle_ranks: tuple[int, ...] = ()):
    """Distinct experts per token, avoiding ``idle_ranks``; ~20% of slots -1 and some rows all -1."""
    gen = torch.Generator().manual_seed(seed)
    experts_per_rank = num_experts // num_ranks
    allowed = torch.tensor([e for e in range(num_experts) if e // experts_per_rank not in idle_ranks])
    topk = torch.empty(num_tokens, num_topk, dtype=torch.int64)
    for t in range(num_tokens):
        topk[t] = allowed[torch.randperm(allowed.numel(), generator=gen)[:num_topk]]
    topk[torch.rand(num_tokens, num_topk, generator=gen) < 0.2] = -1
    if num_tokens >= 4:
        topk[1] = -1
        topk[num_tokens - 2] = -1
    return topk


CASES = [
    # num_tokens, num_topk, num_experts, num_ranks, idle ranks
    (50, 4, 32, 8, (3, 6)),
    (40, 6, 64, 16, (0, 9, 10, 11, 12, 13, 14, 15)),  # node 1 gets only rank 8
    (60, 8, 256, 16, (15,)),
    (30, 2, 16, 4, ()),
    (20, 3, 12, 1, ()),
    (25, 6, 8, 8, (2,)),
    (9, 1, 24, 24, (23,)),
    (0, 4, 32, 16, ()),
]


@pytest.mark.parametrize("num_tokens, num_topk, num_experts, num_ranks, idle", CASES, ids=lambda v: str(v))
def test_layout_matches_loops(num_tokens, num_topk, num_experts, num_ranks, idle):
    topk = random_topk(num_tokens, num_topk, num_experts, num_ranks, seed=num_tokens * 31 + num_experts, idle_ranks=idle)
    with hal.use_backend("reference"):
        per_rank, per_node, per_expert, in_rank = hal.get_dispatch_layout(topk, num_experts, num_ranks)
    want_rank, want_node, want_expert, want_in_rank = layout_by_loops(topk, num_experts, num_ranks)

    assert per_rank.dtype == torch.int32 and per_rank.shape == (num_ranks,)
    assert per_expert.dtype == torch.int32 and per_expert.shape == (num_experts,)
    assert in_rank.dtype == torch.bool and in_rank.shape == (num_tokens, num_ranks)
    assert per_rank.tolist() == want_rank
    assert per_expert.tolist() == want_expert
    assert in_rank.tolist() == want_in_rank
    if num_ranks <= PEERS_PER_NODE:
        assert per_node is None
    else:
        assert per_node.dtype == torch.int32 and per_node.shape == (num_ranks // PEERS_PER_NODE,)
        assert per_node.tolist() == want_node
    for r in idle:
        assert int(per_rank[r]) == 0
        assert not bool(in_rank[:, r].any())
    if num_tokens >= 4:
        assert not bool(in_rank[1].any())


def test_repeated_expert_counts_every_occurrence_but_one_rank_hit():
    topk = torch.tensor([[3, 3, -1], [0, 1, 2], [-1, -1, -1], [7, 4, 3]], dtype=torch.int64)
    with hal.use_backend("reference"):
        per_rank, per_node, per_expert, in_rank = hal.get_dispatch_layout(topk, 8, 2)
    assert per_expert.tolist() == [1, 1, 1, 3, 1, 0, 0, 1]
    assert in_rank.tolist() == [[True, False], [True, False], [False, False], [True, True]]
    assert per_rank.tolist() == [3, 1]
    assert per_node is None


def _check(topk, num_experts, num_ranks, error, builtin, argument):
    with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
        hal.get_dispatch_layout(topk, num_experts, num_ranks)
    assert isinstance(info.value, builtin)
    assert info.value.argument == argument
    assert info.value.op == "get_dispatch_layout"


GOOD = torch.tensor([[0, 5, -1], [7, 2, 1]], dtype=torch.int64)

INVALID = [
    ("topk_int32", GOOD.int(), 8, 4, hal.DTypeError, TypeError, "topk_idx"),
    ("topk_float", GOOD.float(), 8, 4, hal.DTypeError, TypeError, "topk_idx"),
    ("topk_1d", GOOD.flatten(), 8, 4, hal.ShapeError, ValueError, "topk_idx"),
    ("topk_3d", GOOD[None], 8, 4, hal.ShapeError, ValueError, "topk_idx"),
    ("expert_equal_num_experts", torch.tensor([[0, 8]]), 8, 4, hal.ValueRangeError, ValueError, "topk_idx"),
    ("expert_below_minus_1", torch.tensor([[0, -2]]), 8, 4, hal.ValueRangeError, ValueError, "topk_idx"),
    ("experts_not_divisible", GOOD, 10, 4, hal.ValueRangeError, ValueError, "num_experts"),
    ("num_ranks_12", GOOD, 24, 12, hal.ValueRangeError, ValueError, "num_ranks"),
    ("num_ranks_zero", GOOD, 8, 0, hal.ValueRangeError, ValueError, "num_ranks"),
    ("num_experts_float", GOOD, 8.0, 4, hal.DTypeError, TypeError, "num_experts"),
]


@pytest.mark.parametrize("topk, num_experts, num_ranks, error, builtin, argument", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rejects(topk, num_experts, num_ranks, error, builtin, argument):
    _check(topk, num_experts, num_ranks, error, builtin, argument)


def test_more_experts_than_local_memory_holds_runs_the_global_variant_on_opencl():
    """4 bytes per expert beyond the device's local memory must not abort the process."""
    opencl = hal.get_backend("opencl")
    if not opencl.available:
        pytest.skip(f"opencl unavailable: {opencl.availability().reason}")
    num_experts, num_ranks = 1 << 19, 16  # 2 MiB of histogram: more than PoCL's 1 MiB of local memory
    topk_idx = torch.randint(0, num_experts, (32, 8), generator=torch.Generator().manual_seed(0))
    topk_idx[3, 2] = -1
    with hal.use_backend("reference"):
        expected = hal.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    with hal.use_backend("opencl"):
        got = hal.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)


def test_an_absurd_expert_count_is_a_typed_error():
    with pytest.raises(hal.ValueRangeError, match="num_experts"):
        hal.get_dispatch_layout(torch.zeros(4, 2, dtype=torch.int64), 2**40, 2)
