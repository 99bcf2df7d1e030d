"""Expert-parallel load balancing (DeepSeek's EPLB): where to replicate and place experts.

A host-side planning step, not a device kernel: it runs on the CPU in every deployment (as in
DeepSeek's release) and is therefore not dispatched to backends. Given per-layer load
statistics it decides how many replicas each logical expert gets and on which physical slot
(GPU) each replica lives.

Hierarchical policy (when ``num_groups % num_nodes == 0``), DeepSeek's algorithm:

1. pack expert groups onto nodes so that node loads balance (greedy, heaviest group first,
   into the lightest node that still has room);
2. within each node, replicate the expert with the highest load per replica, one replica at a
   time, until the node's physical slots are used;
3. pack the node's physical experts onto its GPUs the same greedy way.

Otherwise the global policy runs the same steps with one group and one node. Ties are broken as
DeepSeek's implementation breaks them (the lowest index wins) and pack loads are summed in float32
as there, so results match it exactly (near-ties included). Unlike DeepSeek's, which checks
nothing, loads that are negative, NaN, infinite or bool, and counts that are not ints, raise typed
errors naming the argument.
"""

from __future__ import annotations

import torch

from hal.checks import expect_int
from hal.errors import DTypeError, ShapeError, ValueRangeError

__all__ = ["rebalance_experts", "rebalance_experts_hierarchical", "balanced_packing", "replicate_experts"]

_OP = "rebalance_experts"


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n items per row into ``num_packs`` packs of n / num_packs items, balancing pack weight.

    Items go heaviest first into the lightest pack with room (the lowest index among equals). A
    pack's load is summed in ``weight``'s dtype, as DeepSeek's implementation sums it (float32 on
    the :func:`rebalance_experts` path): near-ties then break exactly as there.

    Args:
        weight: [rows, n] loads, n divisible by num_packs.

    Returns:
        ``(pack int64 [rows, n], rank_in_pack int64 [rows, n])``.
    """
    rows, items = weight.shape
    if num_packs <= 0 or items % num_packs:
        raise ShapeError("balanced_packing", "weight", f"a number of items divisible by num_packs={num_packs}", f"{items} items", "Pack whole groups per pack.")
    capacity = items // num_packs
    if capacity == 1:
        identity = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return identity, torch.zeros(rows, items, dtype=torch.int64)
    order = weight.float().sort(dim=-1, descending=True).indices
    values, exact, zero = _summable(weight)
    pack = torch.full((rows, items), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, items), -1, dtype=torch.int64)
    for row in range(rows):
        load: list = [zero] * num_packs
        count = [0] * num_packs
        for item in order[row].tolist():
            open_packs = [p for p in range(num_packs) if count[p] < capacity]
            target = min(open_packs, key=load.__getitem__)
            pack[row, item] = target
            rank_in_pack[row, item] = count[target]
            load[target] = exact(load[target] + values[row][item])
            count[target] += 1
    return pack, rank_in_pack


def _summable(weight: torch.Tensor) -> tuple[object, object, object]:
    """(the loads indexable as [row][item], a function rounding a sum to weight's dtype, an empty
    pack's load): NumPy float32 scalars for float32 (float32 + float32 adds in float32, fast),
    Python numbers for float64 and integers (exact), 0-d tensors otherwise (bf16, fp16: torch's
    own rounding, as DeepSeek's sums of 0-d tensors)."""
    host = weight.detach().cpu()
    if host.dtype == torch.float32:
        import numpy as np  # torch's own dependency

        return host.numpy(), np.float32, np.float32(0)
    if host.dtype == torch.float64 or not host.is_floating_point():
        return host.tolist(), lambda total: total, 0
    return host, lambda total: total, 0


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give extra replicas, one at a time, to the expert with the highest load per replica.

    Args:
        weight: float [rows, num_logical].
        num_phy: physical slots per row, >= num_logical (DeepSeek's argument name).

    Returns:
        ``(phy2log int64 [rows, num_phy], replica_rank int64 [rows, num_phy],
        count int64 [rows, num_logical])``.
    """
    rows, num_logical = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    replica_rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    count = torch.ones(rows, num_logical, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for slot in range(num_logical, num_phy):
        busiest = (weight / count).max(dim=-1).indices
        phy2log[:, slot] = busiest
        replica_rank[:, slot] = count[row_ids, busiest]
        count[row_ids, busiest] += 1
    return phy2log, replica_rank, count


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand_as(perm))
    return inverse


def _rebalance_hierarchical(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    logical_per_node = num_logical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # 1. groups onto nodes; "mlog" numbers logical experts node by node in packed order.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_first_mlog = (group_node * groups_per_node + group_rank) * group_size
    log2mlog = (group_first_mlog.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse_permutation(log2mlog)

    # 2. replicas within each node (rows become (layer, node) pairs).
    mlog_load = weight.gather(-1, mlog2log).view(-1, logical_per_node)
    phy2mlog, phy_rank, mlog_count = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. a node's physical experts onto its GPUs, by load per replica.
    phy_load = (mlog_load / mlog_count).gather(-1, phy2mlog)
    gpu, rank_on_gpu = balanced_packing(phy_load, num_gpus // num_nodes)
    placed2phy = _inverse_permutation(gpu * slots_per_gpu + rank_on_gpu)

    placed2mlog = phy2mlog.gather(-1, placed2phy).view(layers, num_nodes, -1)
    placed2mlog = (placed2mlog + torch.arange(num_nodes).view(1, -1, 1) * logical_per_node).flatten(-2)
    phy2log = mlog2log.gather(-1, placed2mlog)
    replica_rank = phy_rank.gather(-1, placed2phy).view(layers, -1)
    logcnt = mlog_count.view(layers, -1).gather(-1, log2mlog)
    return phy2log, replica_rank, logcnt


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical policy alone (DeepSeek's ``rebalance_experts_hierarchical``): groups onto
    nodes, replicas within nodes, physical experts onto GPUs (num_nodes must divide num_groups).

    Returns:
        ``phy2log`` int64 [num_layers, num_physical_experts] (slots GPU by GPU), ``phyrank`` int64
        [num_layers, num_physical_experts] (each slot's replica index), ``logcnt`` int64
        [num_layers, num_logical_experts]. All on the CPU.
    """
    if isinstance(num_groups, int) and isinstance(num_nodes, int) and num_nodes > 0 and num_groups % num_nodes:
        raise ValueRangeError(_OP, "num_groups", f"a multiple of num_nodes={num_nodes} (the hierarchical policy)", str(num_groups),
                              "Use rebalance_experts, which falls back to the global policy.")
    _validate(weight, num_physical_experts, num_groups, num_nodes, num_gpus)
    return _rebalance_hierarchical(weight.float().cpu(), num_physical_experts, num_groups, num_nodes, num_gpus)


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _validate(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise DTypeError(_OP, "weight", "a torch.Tensor [num_layers, num_logical_experts]", type(weight).__name__, "Pass the loads as a tensor.")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ShapeError(
            _OP, "weight", "a 2-d tensor [num_layers >= 1, num_logical_experts >= 1]", f"shape {list(weight.shape)}", "Pass one row of loads per layer."
        )
    if weight.dtype.is_complex or weight.dtype == torch.bool or not (weight.dtype.is_floating_point or _is_integer(weight.dtype)):
        raise DTypeError(_OP, "weight", "real loads (an integer or floating dtype)", f"dtype {str(weight.dtype).removeprefix('torch.')}", "Pass token counts or load estimates, e.g. weight.float().")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        expect_int(_OP, name, value, minimum=1)
    num_logical = weight.shape[1]
    hierarchical = num_groups % num_nodes == 0
    # As the anchor: the hierarchical policy needs groups that divide the experts and nodes that
    # divide the GPUs; otherwise the global policy runs and ignores groups and nodes.
    rules = [
        ("num_groups", not hierarchical or num_logical % num_groups == 0, f"a divisor of the {num_logical} logical experts (the hierarchical policy runs because num_nodes={num_nodes} divides it)", num_groups),
        ("num_replicas", num_replicas >= num_logical, f"at least the {num_logical} logical experts", num_replicas),
        ("num_gpus", not hierarchical or num_gpus % num_nodes == 0, f"a multiple of num_nodes={num_nodes} (hierarchical policy)", num_gpus),
        ("num_replicas", num_replicas % num_gpus == 0, f"a multiple of num_gpus={num_gpus}", num_replicas),
    ]
    for name, ok, expected, value in rules:
        if not ok:
            raise ValueRangeError(_OP, name, expected, str(value), "Choose sizes that divide evenly.")
    if hierarchical and num_logical % num_nodes:
        raise ValueRangeError(_OP, "num_nodes", f"a divisor of the {num_logical} logical experts", str(num_nodes), "Choose sizes that divide evenly.")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueRangeError(_OP, "weight", "finite non-negative loads", "negative, NaN or infinite entries", "Pass token counts or load estimates.")


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan expert replication and placement for balanced expert-parallel load.

    Args:
        weight: [num_layers, num_logical_experts] load statistics (any real dtype, any device).
        num_replicas: physical expert slots, a multiple of num_gpus and >= num_logical_experts.
        num_groups: expert groups (DeepSeek-V3's node-limited routing groups).
        num_nodes: server nodes; the hierarchical policy runs when it divides num_groups, else the
            global policy, which ignores num_groups and num_nodes (as the anchor).
        num_gpus: GPUs in total (a multiple of num_nodes for the hierarchical policy).

    Returns:
        ``phy2log`` int64 [num_layers, num_replicas]: the logical expert in each physical slot
        (slots are numbered GPU by GPU). ``log2phy`` int64 [num_layers, num_logical_experts,
        max_replicas]: the physical slots of each logical expert, -1 padded. ``logcnt`` int64
        [num_layers, num_logical_experts]: replicas per logical expert. All on the CPU.
    """
    _validate(weight, num_replicas, num_groups, num_nodes, num_gpus)
    layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, replica_rank, logcnt = _rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica_rank, logcnt = _rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_replicas = int(logcnt.max())
    log2phy = torch.full((layers, num_logical, max_replicas), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(
        -1, phy2log * max_replicas + replica_rank, torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1)
    )
    return phy2log, log2phy, logcnt
