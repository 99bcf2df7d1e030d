"""``hal.rebalance_experts`` (DeepSeek's EPLB): the README example, structural invariants of both
policies, a balance property and the argument checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hal


def test_readme_example():
    weight = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    phy2log, log2phy, logcnt = hal.rebalance_experts(weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    check_invariants(weight, phy2log, log2phy, logcnt, 16)


def check_invariants(weight, phy2log, log2phy, logcnt, num_replicas):
    layers, num_logical = weight.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.device.type == log2phy.device.type == logcnt.device.type == "cpu"
    assert phy2log.shape == (layers, num_replicas)
    assert logcnt.shape == (layers, num_logical)
    assert log2phy.shape == (layers, num_logical, int(logcnt.max()))
    assert logcnt.sum(dim=1).tolist() == [num_replicas] * layers
    assert bool((logcnt >= 1).all())
    for layer in range(layers):
        slots = phy2log[layer].tolist()
        assert all(0 <= e < num_logical for e in slots)
        for e in range(num_logical):
            count = int(logcnt[layer, e])
            where = [s for s, owner in enumerate(slots) if owner == e]
            assert len(where) == count
            listed = log2phy[layer, e, :count].tolist()
            assert sorted(listed) == where
            assert log2phy[layer, e, count:].tolist() == [-1] * (log2phy.shape[2] - count)


def random_weight(layers: int, experts: int, seed: int, *, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    skew = torch.rand(layers, experts, generator=gen) ** 3 * 1000 + 1
    return skew.to(dtype) if dtype.is_floating_point else skew.round().to(dtype)


HIERARCHICAL = [
    # layers, experts, replicas, groups, nodes, gpus
    (3, 12, 16, 4, 2, 8),
    (2, 16, 24, 8, 2, 4),
    (2, 32, 48, 8, 4, 8),
    (1, 8, 8, 4, 2, 4),  # no redundant experts
]
GLOBAL = [
    (3, 12, 16, 3, 2, 8),
    (2, 10, 12, 5, 2, 4),
    (2, 16, 20, 1, 2, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float64], ids=["f32", "i64", "f64"])
@pytest.mark.parametrize("layers, experts, replicas, groups, nodes, gpus", HIERARCHICAL, ids=str)
def test_hierarchical_invariants(layers, experts, replicas, groups, nodes, gpus, dtype):
    assert groups % nodes == 0
    weight = random_weight(layers, experts, seed=experts * 10 + replicas, dtype=dtype)
    phy2log, log2phy, logcnt = hal.rebalance_experts(weight, replicas, groups, nodes, gpus)
    check_invariants(weight, phy2log, log2phy, logcnt, replicas)

    group_size = experts // groups
    slots_per_node = replicas // nodes
    for layer in range(layers):
        node_of_slot = [s // slots_per_node for s in range(replicas)]
        groups_on_node: dict[int, set[int]] = {n: set() for n in range(nodes)}
        for g in range(groups):
            nodes_of_group = {node_of_slot[s] for s, e in enumerate(phy2log[layer].tolist()) if e // group_size == g}
            assert len(nodes_of_group) == 1, f"group {g} of layer {layer} spans nodes {nodes_of_group}"
            groups_on_node[nodes_of_group.pop()].add(g)
        assert all(len(gs) == groups // nodes for gs in groups_on_node.values())


@pytest.mark.parametrize("layers, experts, replicas, groups, nodes, gpus", GLOBAL, ids=str)
def test_global_invariants(layers, experts, replicas, groups, nodes, gpus):
    assert groups % nodes != 0
    weight = random_weight(layers, experts, seed=experts * 7 + replicas)
    phy2log, log2phy, logcnt = hal.rebalance_experts(weight, replicas, groups, nodes, gpus)
    check_invariants(weight, phy2log, log2phy, logcnt, replicas)
    # greedy replication: removing the last replica of any replicated expert would make it the
    # busiest per replica (ties allowed)
    per_replica = weight / logcnt
    for layer in range(layers):
        top = float(per_replica[layer].max())
        for e in range(experts):
            count = int(logcnt[layer, e])
            if count > 1:
                assert float(weight[layer, e]) / (count - 1) >= top * (1 - 1e-6)


def test_global_policy_equals_one_group_one_node():
    weight = random_weight(2, 12, seed=3)
    a = hal.rebalance_experts(weight, 16, 3, 2, 8)  # 3 % 2 != 0 -> global
    b = hal.rebalance_experts(weight, 16, 1, 1, 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, gpus: int) -> torch.Tensor:
    """[layers, gpus]: sum of weight[e] / logcnt[e] over each GPU's slots (slots numbered GPU by GPU)."""
    per_slot = (weight.double() / logcnt.double()).gather(1, phy2log)
    return per_slot.view(weight.shape[0], gpus, -1).sum(dim=2)


@pytest.mark.parametrize(
    "experts, replicas, groups, nodes, gpus",
    [(16, 24, 4, 2, 8), (12, 24, 3, 2, 8), (32, 40, 8, 1, 8), (12, 16, 4, 2, 4)],
    ids=str,
)
def test_balance_beats_round_robin_on_skewed_load(experts, replicas, groups, nodes, gpus):
    gen = torch.Generator().manual_seed(experts + replicas + groups)
    layers = 4
    # Zipf-like loads in a random order per layer
    base = 1000.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    weight = torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(layers)])
    weight = weight * (1 + 0.1 * torch.rand(layers, experts, generator=gen, dtype=torch.float64))
    phy2log, _, logcnt = hal.rebalance_experts(weight, replicas, groups, nodes, gpus)
    balanced = gpu_loads(weight, phy2log, logcnt, gpus)
    torch.testing.assert_close(balanced.sum(dim=1), weight.sum(dim=1))  # all load is placed
    naive = torch.zeros(layers, gpus, dtype=torch.float64)
    for e in range(experts):
        naive[:, e % gpus] += weight[:, e]
    assert bool((balanced.max(dim=1).values <= naive.max(dim=1).values).all())


def test_load_is_accepted_on_any_real_dtype_and_results_on_cpu():
    weight = random_weight(1, 8, seed=9).half()
    phy2log, log2phy, logcnt = hal.rebalance_experts(weight, 8, 2, 1, 2)
    check_invariants(weight.float(), phy2log, log2phy, logcnt, 8)


def _good_weight() -> torch.Tensor:
    return random_weight(2, 12, seed=1)


INVALID = [
    ("weight_1d", lambda: (_good_weight()[0], 16, 4, 2, 8), hal.ShapeError, ValueError, "weight"),
    ("weight_3d", lambda: (_good_weight()[None], 16, 4, 2, 8), hal.ShapeError, ValueError, "weight"),
    # hal/errors.py: DTypeError covers "a non-tensor where a tensor is required" (as expect_tensor does)
    ("weight_list", lambda: (_good_weight().tolist(), 16, 4, 2, 8), hal.DTypeError, TypeError, "weight"),
    ("weight_no_layers", lambda: (torch.rand(0, 12), 16, 4, 2, 8), hal.ShapeError, ValueError, "weight"),
    ("replicas_below_experts", lambda: (_good_weight(), 8, 4, 2, 8), hal.ValueRangeError, ValueError, "num_replicas"),
    ("replicas_not_multiple_of_gpus", lambda: (_good_weight(), 20, 4, 2, 8), hal.ValueRangeError, ValueError, "num_replicas"),
    ("replicas_zero", lambda: (_good_weight(), 0, 4, 2, 8), hal.ValueRangeError, ValueError, "num_replicas"),
    ("replicas_float", lambda: (_good_weight(), 16.0, 4, 2, 8), hal.DTypeError, TypeError, "num_replicas"),
    ("complex_weight", lambda: (_good_weight().to(torch.complex64), 16, 4, 2, 8), hal.DTypeError, TypeError, "weight"),
    ("bool_weight", lambda: (_good_weight() > 0.5, 16, 4, 2, 8), hal.DTypeError, TypeError, "weight"),
    # hierarchical (num_nodes divides num_groups): groups must divide the experts, nodes the GPUs
    ("groups_not_dividing", lambda: (_good_weight(), 16, 8, 2, 8), hal.ValueRangeError, ValueError, "num_groups"),
    ("gpus_not_multiple_of_nodes", lambda: (_good_weight(), 18, 4, 2, 9), hal.ValueRangeError, ValueError, "num_gpus"),
    ("negative_weight", lambda: (_good_weight().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(-1.0)), 16, 4, 2, 8),
     hal.ValueRangeError, ValueError, "weight"),
    ("nan_weight", lambda: (_good_weight().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan)), 16, 4, 2, 8),
     hal.ValueRangeError, ValueError, "weight"),
    ("inf_weight", lambda: (_good_weight().index_put_((torch.tensor([0]), torch.tensor([5])), torch.tensor(math.inf)), 16, 4, 2, 8),
     hal.ValueRangeError, ValueError, "weight"),
]


@pytest.mark.parametrize("make, error, builtin, argument", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rejects(make, error, builtin, argument):
    with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
        hal.rebalance_experts(*make())
    assert isinstance(info.value, builtin)
    assert info.value.argument == argument
    assert info.value.op == "rebalance_experts"


@pytest.mark.parametrize("num_groups, num_nodes, num_gpus", [(5, 2, 8), (3, 2, 4), (7, 4, 6)])
def test_groups_that_nodes_do_not_divide_use_the_global_policy_and_are_ignored(num_groups, num_nodes, num_gpus):
    """As the anchor: when num_groups % num_nodes != 0 the global policy runs, with groups and nodes ignored."""
    weight = random_weight(3, 32, seed=num_groups)
    got = hal.rebalance_experts(weight, 8 * num_gpus, num_groups, num_nodes, num_gpus)
    flat = hal.rebalance_experts(weight, 8 * num_gpus, 1, 1, num_gpus)
    for a, b in zip(got, flat):
        assert torch.equal(a, b)


def _greedy_packing_float32(loads: list[float], num_packs: int) -> list[int]:
    """Oracle: heaviest first (torch's sort order) into the lightest open pack, lowest index among
    equals, each pack's load summed in float32 (as DeepSeek's 0-d float32 tensors sum it)."""
    import numpy as np

    weight = torch.tensor([loads], dtype=torch.float32)
    order = weight.sort(dim=-1, descending=True).indices[0].tolist()
    capacity = len(loads) // num_packs
    load, count, pack = [np.float32(0)] * num_packs, [0] * num_packs, [0] * len(loads)
    for item in order:
        target = min((p for p in range(num_packs) if count[p] < capacity), key=lambda p: load[p])
        pack[item], count[target] = target, count[target] + 1
        load[target] = np.float32(load[target] + np.float32(loads[item]))
    return pack


def test_pack_loads_sum_in_float32_so_near_ties_break_as_deepseeks():
    # 16777216 + 1.5 is 16777218 in float32 (a tie with the first item), not in float64.
    phy2log, _, _ = hal.rebalance_experts(torch.tensor([[16777218.0, 16777216.0, 1.5, 1.0, 0.5, 0.25]]), 6, 1, 1, 2)
    assert phy2log.tolist() == [[0, 3, 5, 1, 2, 4]]
    phy2log, _, _ = hal.rebalance_experts(torch.tensor([[2, 0, 5, 1, 0]]), 12, 1, 1, 3)  # per-replica loads 5/3 etc.
    assert phy2log.tolist() == [[3, 2, 0, 1, 2, 2, 2, 4, 2, 2, 0, 0]]
    g = torch.Generator().manual_seed(4)
    for _ in range(60):
        n, packs = 12, [2, 3, 4, 6][int(torch.randint(0, 4, (1,), generator=g))]
        loads = ((torch.rand(n, generator=g) * 3).round() / 3 * (2 ** 24 if torch.rand(1, generator=g) < 0.3 else 1)).tolist()
        pack, _ = hal.ops.eplb.balanced_packing(torch.tensor([loads], dtype=torch.float32), packs)
        assert pack[0].tolist() == _greedy_packing_float32(loads, packs), loads


def test_balanced_packing_needs_whole_packs():
    with pytest.raises(hal.ShapeError, match="num_packs"):
        hal.ops.eplb.balanced_packing(torch.rand(2, 6), 4)


def test_compat_module_has_deepseeks_names_and_hierarchical_policy():
    from hal.compat import eplb

    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    assert eplb.__all__ == ["rebalance_experts"]
    h_phy2log, phyrank, h_logcnt = eplb.rebalance_experts_hierarchical(weight.float(), 16, 4, 2, 8)
    assert torch.equal(h_phy2log, phy2log) and torch.equal(h_logcnt, logcnt)
    for layer in range(2):  # phyrank: slot s holds replica phyrank[s] of its expert, log2phy lists it there
        for slot in range(16):
            assert int(log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]]) == slot
    _, _, count = eplb.replicate_experts(weight.float(), num_phy=16)
    assert int(count.sum()) == 32
    with pytest.raises(hal.ValueRangeError, match="num_groups"):
        eplb.rebalance_experts_hierarchical(weight.float(), 16, 3, 2, 8)
