"""A small expert-parallel MoE layer through hal, checked against a single-process reference.

::

    torchrun --nproc-per-node 4 examples/ep_moe.py                  # gloo on CPU, NCCL on GPUs
    torchrun --nproc-per-node 4 examples/ep_moe.py --low-latency    # decode path

Every rank routes its tokens (top-k of a gate), dispatches them to the ranks holding their
experts (``hal.ep.Buffer``), runs its local experts as one FP8 grouped GEMM through hal, and
combines the outputs back: ``y[t] = sum_k w[t, k] * (x[t] @ W[e_k].T)`` with x cast per token
per 128 channels and W per 128x128 block. Normal mode groups the received tokens per expert in
DeepGEMM's contiguous layout (``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``); low-latency mode
receives FP8 tokens in per-expert slots and uses the masked GEMM. Each rank regenerates every
rank's inputs from seeds, computes its own tokens' outputs in one process, and the script exits
non-zero if any rank's result differs (``1 - 2xy/(x^2 + y^2)`` above 1e-5, DeepEP's combine bound).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import hal
from hal.ops.fp8_quant import dequantize_per_block, dequantize_per_token

TOLERANCE = 1e-5


def tokens_of(rank: int, args: argparse.Namespace) -> torch.Tensor:
    """This rank's tokens: a different count on each rank, bf16 [num_tokens, hidden]."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(args.tokens + 8 * rank, args.hidden, generator=generator).to(torch.bfloat16)


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token (distinct ids) and their softmax weights (float32)."""
    scores = x.float() @ gate.t()
    weights, topk_idx = scores.topk(top_k, dim=1)
    return topk_idx, torch.softmax(weights, dim=1)


def reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One process, every expert: y = sum_k w_k * bf16(x_fp8 @ W_fp8[e_k].T), in float32."""
    xq = dequantize_per_token(*hal.per_token_cast_to_fp8(x))
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32)
    for e in range(w.shape[0]):
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        wq = dequantize_per_block(*hal.per_block_cast_to_fp8(w[e]))
        expert_out = (xq[token] @ wq.t()).to(torch.bfloat16).float()
        y.index_add_(0, token, expert_out * topk_weights[token, slot].unsqueeze(1))
    return y.to(torch.bfloat16)


def local_experts(w: torch.Tensor, rank: int, num_local: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's experts as the grouped GEMM's RHS: (fp8 [G, N, K], float32 [G, N/128, K/128])."""
    casts = [hal.per_block_cast_to_fp8(w[rank * num_local + g].to(device)) for g in range(num_local)]
    return torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])


def moe_normal(buffer: hal.ep.Buffer, x, topk_idx, topk_weights, rhs, num_experts: int) -> torch.Tensor:
    """Dispatch bf16 tokens, group them per local expert (contiguous layout), GEMM, weight, combine."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    num_local, alignment = rhs[0].shape[0], hal.get_m_alignment_for_contiguous_layout()
    # expert_alignment makes the per-expert counts the padded segment sizes of DeepGEMM's contiguous layout.
    recv_x, recv_topk_idx, recv_topk_weights, padded, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, expert_alignment=alignment,
    )
    # One row per (received token, local expert), grouped by expert then token: hal's EP pack
    # does exactly this; the weights of those selections, in the same order, come from a stable sort.
    rows, src, counts = hal.ep_pack(recv_x, recv_topk_idx, num_local)
    selected = recv_topk_idx >= 0
    weight = recv_topk_weights[selected][torch.sort(recv_topk_idx[selected], stable=True).indices]
    place = torch.cat([torch.arange(int(c)) + sum(padded[:g]) for g, c in enumerate(counts.tolist())]).long().to(x.device)
    m_indices = torch.full((sum(padded),), -1, dtype=torch.int32, device=x.device)
    m_indices[place] = torch.repeat_interleave(torch.arange(num_local, dtype=torch.int32, device=x.device), counts)
    lhs_rows = torch.zeros(sum(padded), x.shape[1], dtype=x.dtype, device=x.device)
    lhs_rows[place] = rows
    out = torch.empty(sum(padded), rhs[0].shape[1], dtype=torch.bfloat16, device=x.device)
    hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(hal.per_token_cast_to_fp8(lhs_rows), rhs, out, m_indices)
    expert_out = hal.ep_combine_reduce(out[place], src, recv_x.shape[0], weight)  # sum of this rank's experts per token
    combined_x, _, _ = buffer.combine(expert_out, handle)
    return combined_x


def moe_low_latency(buffer: hal.ep.Buffer, x, topk_idx, topk_weights, rhs, num_experts: int, max_tokens: int) -> torch.Tensor:
    """Dispatch FP8 tokens into per-expert slots, masked GEMM, combine with weights."""
    (recv_fp8, recv_scales), recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8=True)
    out = torch.zeros(recv_fp8.shape[0], recv_fp8.shape[1], rhs[0].shape[1], dtype=torch.bfloat16, device=x.device)
    expected_m = max(int(recv_count.float().mean()), 1)
    hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked((recv_fp8, recv_scales), rhs, out, recv_count, expected_m)
    combined_x, _, _ = buffer.low_latency_combine(out, topk_idx, topk_weights, handle)
    return combined_x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=48, help="tokens on rank 0 (rank r has 8r more)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--low-latency", action="store_true")
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    num_experts = args.experts_per_rank * world
    generator = torch.Generator().manual_seed(7)  # the same gate and experts on every rank
    gate = torch.randn(num_experts, args.hidden, generator=generator)
    w = (torch.randn(num_experts, args.hidden, args.hidden, generator=generator) / args.hidden**0.5).to(torch.bfloat16)
    x = tokens_of(rank, args)
    topk_idx, topk_weights = route(x, gate, args.top_k)
    buffer = hal.ep.Buffer(dist.group.WORLD)
    rhs = local_experts(w, rank, args.experts_per_rank, device)
    on_device = (x.to(device), topk_idx.to(device), topk_weights.to(device), rhs, num_experts)
    if args.low_latency:
        max_tokens = args.tokens + 8 * (world - 1)  # the largest rank's count (tokens_of)
        y = moe_low_latency(buffer, *on_device, max_tokens)
    else:
        y = moe_normal(buffer, *on_device)
    expected = reference(x, topk_idx, topk_weights, w)
    got, want = y.double().cpu(), expected.double()
    diff = 1 - 2 * float((got * want).sum()) / max(float((got * got + want * want).sum()), 1e-12)
    ok = torch.tensor([int(diff < TOLERANCE)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    mode = "low-latency" if args.low_latency else "normal"
    print(f"rank {rank}/{world} ({mode}, {x.shape[0]} tokens on {device}): 1 - cos = {diff:.2e} {'ok' if diff < TOLERANCE else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    return 0 if int(ok.item()) else 1


if __name__ == "__main__":
    sys.exit(main())
