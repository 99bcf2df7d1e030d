"""Expert-parallel dispatch layout (DeepEP's ``get_dispatch_layout``) as one OpenCL kernel.

Each work-item takes one token: it writes the token's row of ``is_token_in_rank`` and counts the
token once per expert slot, once per rank and (across nodes) once per node it reaches. Counts
go to per-work-group histograms in local memory first, then one global atomic add per bin and
work-group, so the global counters see few atomics. Integer counts: the result is exact
whatever the order of the atomics.

Layouts: topk_idx int64 [num_tokens, num_topk] (made contiguous); outputs as
:func:`hal.ops.ep.get_dispatch_layout`.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import torch

from hal.backends.opencl.buffers import bind
from hal.backends.opencl.device import runtime
from hal.backends.opencl.program import build
from hal.ops.ep import NVL_PEERS_PER_NODE

__all__ = ["dispatch_layout"]

LOCAL_MEMORY_RESERVE = 1024  # bytes a runtime may keep for itself out of CL_DEVICE_LOCAL_MEM_SIZE

EP_LAYOUT_SOURCE = r"""
/* NODE: ranks per node (8). One token's contribution, counted into the histograms of address
   space SPACE: local per-work-group bins when they fit the device's local memory, else straight
   into the global counters (more atomics, but no local memory however many experts there are). */
#define COUNT_TOKEN(SPACE, expert_hist, rank_hist, node_hist)                                        \
    {                                                                                               \
        const int experts_per_rank = num_experts / num_ranks;                                       \
        __global const long* row = topk_idx + (long)token * num_topk;                               \
        __global uchar* hits = is_token_in_rank + (long)token * num_ranks;                          \
        for (int r = 0; r < num_ranks; ++r) hits[r] = 0;                                            \
        for (int k = 0; k < num_topk; ++k) {                                                        \
            const long expert = row[k];                                                             \
            if (expert < 0) continue;                                                               \
            atomic_inc((SPACE int*)(expert_hist) + expert);                                         \
            const int rank = (int)(expert / experts_per_rank);                                      \
            if (hits[rank]) continue;          /* a token counts once per rank */                   \
            if (count_nodes) {                                                                      \
                const int first = rank / NODE * NODE;                                               \
                int reached = 0;                                                                    \
                for (int r = first; r < first + NODE; ++r) reached |= hits[r];                      \
                if (!reached) atomic_inc((SPACE int*)(node_hist) + rank / NODE);                    \
            }                                                                                       \
            hits[rank] = 1;                                                                         \
            atomic_inc((SPACE int*)(rank_hist) + rank);                                             \
        }                                                                                           \
    }

/* Local histogram: [experts | ranks | nodes] ints, size given at launch. */
__kernel void dispatch_layout(
    __global const long* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks, int count_nodes,
    __global uchar* is_token_in_rank, __global int* tokens_per_rank, __global int* tokens_per_expert,
    __global int* tokens_per_node, __local int* histogram)
{
    const int lid = get_local_id(0), local_size = get_local_size(0);
    const int num_nodes = count_nodes ? num_ranks / NODE : 0;
    const int bins = num_experts + num_ranks + num_nodes;
    __local int* expert_hist = histogram;
    __local int* rank_hist = histogram + num_experts;
    __local int* node_hist = rank_hist + num_ranks;
    for (int i = lid; i < bins; i += local_size) histogram[i] = 0;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int token = get_global_id(0);
    if (token < num_tokens) COUNT_TOKEN(__local, expert_hist, rank_hist, node_hist)
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = lid; i < bins; i += local_size) {
        const int count = histogram[i];
        if (count == 0) continue;
        if (i < num_experts) atomic_add(tokens_per_expert + i, count);
        else if (i < num_experts + num_ranks) atomic_add(tokens_per_rank + (i - num_experts), count);
        else atomic_add(tokens_per_node + (i - num_experts - num_ranks), count);
    }
}

__kernel void dispatch_layout_global(
    __global const long* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks, int count_nodes,
    __global uchar* is_token_in_rank, __global int* tokens_per_rank, __global int* tokens_per_expert,
    __global int* tokens_per_node)
{
    const int token = get_global_id(0);
    if (token < num_tokens) COUNT_TOKEN(__global, tokens_per_expert, tokens_per_rank, tokens_per_node)
}
"""

Layout = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor]


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> Layout:
    """See :func:`hal.ops.ep.get_dispatch_layout` (arguments already validated)."""
    num_tokens, num_topk = topk_idx.shape
    count_nodes = num_ranks > NVL_PEERS_PER_NODE
    tokens_per_rank = torch.zeros(num_ranks, dtype=torch.int32)
    tokens_per_node = torch.zeros(num_ranks // NVL_PEERS_PER_NODE, dtype=torch.int32) if count_nodes else None
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32)
    is_token_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
    if num_tokens == 0:
        return tokens_per_rank, tokens_per_node, tokens_per_expert, is_token_in_rank
    rt = runtime()
    program = build(rt, "ep_layout", EP_LAYOUT_SOURCE, {"NODE": NVL_PEERS_PER_NODE})
    # CPUs: one work-group per core keeps the histogram merge to a few atomics; GPUs: 256-wide groups.
    local = min(rt.max_work_group_size, 256)
    if rt.is_cpu:
        local = min(local, max(1, -(-num_tokens // rt.compute_units)))
    bins = num_experts + num_ranks + (num_ranks // NVL_PEERS_PER_NODE if count_nodes else 0)
    # The local histogram must fit the device's local memory (a launch asking for more aborts
    # some runtimes): beyond it, the variant that counts straight into global memory.
    fits = 4 * bins <= rt.local_mem_size - LOCAL_MEMORY_RESERVE
    with bind(rt, "ep_layout.dispatch_layout") as io:
        args = [
            io.input(topk_idx), np.int32(num_tokens), np.int32(num_topk), np.int32(num_experts), np.int32(num_ranks),
            np.int32(count_nodes), io.output(is_token_in_rank), io.output(tokens_per_rank), io.output(tokens_per_expert),
            io.output(tokens_per_node) if tokens_per_node is not None else io.scratch(4),
        ]
        kernel = "dispatch_layout" if fits else "dispatch_layout_global"
        program.launch(kernel, (-(-num_tokens // local) * local,), (local,), *args, *([cl.LocalMemory(4 * bins)] if fits else []))
    return tokens_per_rank, tokens_per_node, tokens_per_expert, is_token_in_rank
