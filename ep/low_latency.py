"""Low-latency dispatch and combine (DeepEP's decode path) over torch.distributed.

Verified against deepseek-ai/DeepEP (``deep_ep/buffer.py``, ``csrc/kernels/internode_ll.cu``,
``csrc/kernels/utils.cuh``, ``tests/test_low_latency.py`` at 567632d, the last commit before EPv2):

- A token is sent once per selected expert, not per rank: expert g receives
  ``(all_topk_idx == g).sum()`` tokens over all ranks, and at most
  ``num_max_dispatch_tokens_per_rank`` from each rank.
- ``recv_x`` is ``[num_local_experts, R * max_tokens, hidden]``; local expert e's tokens fill
  its first ``recv_count[e]`` slots. ``handle[1][e, j] = (begin << 32) | count`` gives the slots
  holding source rank j's tokens and ``handle[0][e, slot]`` each token's index on its source
  rank. DeepEP places source blocks (and tokens within them) in arrival order; here blocks are
  by source rank and tokens by index: one of the layouts DeepEP may produce, made deterministic.
  Unused slots are zero here (DeepEP leaves them unspecified) with ``src_info`` -1.
- ``use_fp8``: the sender casts before sending, per token per 128 channels, as DeepEP's
  ``calculate_fp8_scales``: amax floored at 1e-4 (``kFP8Margin``), codes ``x * (448 / amax)`` in
  e4m3, scale ``amax * (1 / 448)`` (a multiply by the fp32 reciprocal, as DeepEP's kernel; a
  correctly rounded division, as torch takes ``amax / 448`` on the CPU, differs in the last bit
  for about half the scales). NaN elements do not enter amax. The scales come back
  ``[num_local_experts, R * max_tokens, hidden / 128]`` float32 with the last two dimensions
  column-major, as DeepEP returns them for TMA.
- Combine reduces with weights: ``combined[t] = sum_k w[t, k] * y_k[t]`` over the selected k, in
  float32, returned as bf16 ``[num_tokens, hidden]`` (0 for a token with no expert).
- The hook: this transport returns a callable that does nothing (data has arrived when the call
  returns); ``hal.ep.Buffer`` hands it out only with ``return_recv_hook``, else None, as DeepEP.

- ``round_scale``: scales rounded up to powers of two before the codes are taken (DeepEP's
  ``fast_pow2(ceil(log2(amax * (1 / 448))))``), codes ``x * 2^-e``; ``use_ue8m0`` returns them packed, four exponents per
  int32 ([num_local_experts, R * max_tokens, hidden / 512], column-major like the float scales;
  empty slots 0).
- ``use_logfmt``: the combine payload travels in LogFMT-10 (:mod:`hal.ops.logfmt`) and is decoded
  by the receiver before the weighted reduction.

Not measured: ``dispatch_wait_recv_cost_stats`` / ``combine_wait_recv_cost_stats`` (checked, left as is).
With ``zero_copy``, combine reads the expert outputs from the buffer of
``get_next_low_latency_combine_buffer`` (``x`` gives the shape), as DeepEP's kernel does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import math

import torch

from hal.checks import FP8, expect_int, expect_tensor
from hal.ep.agreement import agree
from hal.ep.checks import check_device, check_experts, check_handle, check_topk, check_weights
from hal.ep.comm import Communicator, Outgoing
from hal.ep.errors import EPError, EPMismatchError
from hal.ep.event import EventOverlap, capture, received
from hal.ep.handle import LowLatencyHandle
from hal.ep.message import Field
from hal.errors import DTypeError, ShapeError, ValueRangeError
from hal.ops.ep_local import ep_combine_reduce, ep_unpack
from hal.ops import ue8m0
from hal.ops.fp8_quant import AMAX_FLOOR, BLOCK
from hal.ops.logfmt import logfmt_decode, logfmt_encode

__all__ = ["dispatch", "combine"]

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Send:
    outgoing: Outgoing
    announced: list[int]
    owner_order: tuple[torch.Tensor, torch.Tensor] | None = None  # combine: (token int32 [S], weight float32 [S])


def _check_count(op: str, num_tokens: int, num_max: object) -> int:
    expect_int(op, "num_max_dispatch_tokens_per_rank", num_max, minimum=1)
    assert isinstance(num_max, int)
    if num_tokens > num_max:
        raise ValueRangeError(
            op, "x", f"at most num_max_dispatch_tokens_per_rank={num_max} tokens", f"{num_tokens} tokens",
            "Raise num_max_dispatch_tokens_per_rank (the same on every rank) or dispatch fewer tokens.",
        )
    return num_max


def _expert_major(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token int32 [S], weight float32 [S], per-expert counts [E]) of each selection, expert first,
    then token: the order ep_pack gave the dispatched rows, in which their outputs come back."""
    token, slot = (topk_idx >= 0).nonzero(as_tuple=True)
    expert = topk_idx[token, slot]
    order = torch.sort(expert, stable=True).indices
    return token[order].to(torch.int32), topk_weights[token, slot][order], torch.bincount(expert, minlength=num_experts)


# DeepEP's kFinfoAmaxInvE4M3 (1 / 448.0f): the fp32 quotient, as a Python float holding that fp32
# value (a tensor times it multiplies in fp32 on any device, with no copy to the device).
_INV_448 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32))


def cast_fp8(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's low-latency FP8 cast of bf16 tokens [T, hidden] (hidden a multiple of 128), bit for
    bit: per token and 128 channels, ``amax = max(1e-4, max |x|)`` (NaN skipped, as ``fmaxf``
    skips it: only a NaN element's code is NaN); ``scale_inv = amax * (1 / 448)``
    in fp32 and codes ``e4m3(x * (448 / amax))``; with ``round_scale``, ``scale_inv = 2^e`` with
    ``e = ceil(log2(amax * (1 / 448)))`` (read from the fp32 bits, as ``fast_log2_ceil``) and codes
    ``e4m3(x * 2^-e)``. Returns ``(float8_e4m3fn [T, hidden], float32 [T, hidden / 128])``."""
    tokens, hidden = x.shape
    groups = x.float().view(tokens, hidden // BLOCK, BLOCK)
    amax = torch.nan_to_num(groups.abs(), nan=0.0, posinf=math.inf).amax(dim=2).clamp_min(AMAX_FLOOR)  # kFP8Margin
    scale_inv = amax * _INV_448
    if round_scale:
        bits = scale_inv.view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale, scale_inv = ((127 - exponent) << 23).view(torch.float32), ((127 + exponent) << 23).view(torch.float32)
    else:
        scale = torch.full_like(amax, 448.0) / amax  # a true division (448.0 / amax is a reciprocal times 448 in torch)
    codes = (groups * scale.unsqueeze(2)).to(FP8).view(tokens, hidden)
    return codes, scale_inv


def dispatch(
    comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, *, num_max_dispatch_tokens_per_rank: int, num_experts: int,
    use_fp8: bool, cumulative_local_expert_recv_stats: torch.Tensor | None, round_scale: bool = False, use_ue8m0: bool = False,
) -> tuple[Tokens, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None]]:
    """Send each token to each of its experts' slots; see ``hal.ep.Buffer.low_latency_dispatch``."""
    op = "Buffer.low_latency_dispatch"
    me, world = comm.rank, comm.world

    def prepare() -> tuple[dict[str, int], _Send]:
        expect_tensor(op, "x", x, dtypes=torch.bfloat16, shape=(None, None), dims=("num_tokens", "hidden"))
        check_device(op, "x", x, comm)
        num_tokens, hidden = x.shape
        num_max = _check_count(op, num_tokens, num_max_dispatch_tokens_per_rank)
        local = check_experts(op, num_experts, comm)
        check_topk(op, topk_idx, num_tokens, num_experts, comm)
        if not isinstance(use_fp8, bool):
            raise DTypeError(op, "use_fp8", "a bool", type(use_fp8).__name__, "Pass use_fp8=True or False.")
        if use_fp8 and hidden % BLOCK:
            raise ShapeError(op, "x", f"hidden a multiple of {BLOCK} with use_fp8", f"hidden={hidden}", "Pad the hidden size, or pass use_fp8=False.")
        if cumulative_local_expert_recv_stats is not None:
            expect_tensor(op, "cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, dtypes=torch.int32, shape=(local,), dims=("num_local_experts",))
            check_device(op, "cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, comm)
        message = {"src": torch.arange(num_tokens, dtype=torch.int32, device=x.device), "x": x}
        fields = [Field("src", torch.int32, ()), Field("x", x.dtype, (hidden,))]
        if use_fp8:
            message["x"], message["x_scales"] = cast_fp8(x, round_scale)
            fields = [Field("x_scales", torch.float32, (hidden // BLOCK,)), Field("src", torch.int32, ()), Field("x", FP8, (hidden,))]
        outgoing = comm.prepare_rows(fields, message, topk_idx, num_experts)
        assert outgoing.counts is not None
        if use_ue8m0 and hidden % (4 * BLOCK):
            raise ShapeError(op, "x", f"hidden a multiple of {4 * BLOCK} with use_ue8m0 (four scales per int32)", f"hidden={hidden}", "Pass use_ue8m0=False.")
        facts = {"hidden": hidden, "num_experts": num_experts, "max_tokens": num_max, "use_fp8": int(use_fp8), "round_scale": int(round_scale), "use_ue8m0": int(use_ue8m0)}
        return facts, _Send(outgoing, outgoing.counts.tolist())

    agreed = agree(comm, op, prepare)
    send = agreed.plan
    local = num_experts // world
    table = comm.all_gather_ints(send.announced, "expert counts")  # [R, E]: rank i's selections of each expert
    incoming = table[:, me * local : (me + 1) * local]  # [source rank, local expert]
    rows = comm.exchange(send.outgoing, table[me].view(world, local).sum(dim=1).tolist(), incoming.sum(dim=1).tolist(), "tokens")
    device = rows["x"].device
    # Rows arrive by source rank, then local expert, then token.
    expert_of_row = torch.arange(local).repeat(world).repeat_interleave(incoming.flatten()).to(torch.int32).to(device)
    got = {}
    for name, field in rows.items():  # each field into its expert slots
        slots, recv_count = ep_unpack(field.reshape(field.shape[0], math.prod(field.shape[1:])), expert_of_row, local, world * num_max_dispatch_tokens_per_rank)
        got[name] = slots.view((local, world * num_max_dispatch_tokens_per_rank) + tuple(field.shape[1:]))
        if not torch.equal(recv_count.cpu().long(), incoming.sum(dim=0)):
            raise EPError(f"{op} on rank {me}: unpacked {recv_count.tolist()} tokens per local expert, the senders announced {incoming.sum(dim=0).tolist()}.")
    valid = torch.arange(world * num_max_dispatch_tokens_per_rank, device=device) < recv_count.unsqueeze(1)
    src_info = torch.where(valid, got["src"], -1)
    begin = incoming.cumsum(dim=0) - incoming
    layout_range = ((begin.t() << 32) | incoming.t()).contiguous().to(device)
    recv_x: Tokens = got["x"]
    if "x_scales" in got:
        scales = got["x_scales"]
        if use_ue8m0:  # four UE8M0 exponents per int32 along hidden (unused slots: zero scales pack as 0)
            scales = ue8m0.pack_ue8m0_to_int(torch.where(scales > 0, scales, torch.ones_like(scales))).masked_fill(~valid.unsqueeze(2), 0)
        column_major = torch.empty(local, scales.shape[2], scales.shape[1], dtype=scales.dtype, device=device).transpose(1, 2)
        column_major.copy_(scales)
        recv_x = (got["x"], column_major)
    if cumulative_local_expert_recv_stats is not None:
        cumulative_local_expert_recv_stats += recv_count
    handle = LowLatencyHandle(src_info, layout_range, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, agreed.number, comm.owner)
    return recv_x, recv_count, handle, capture(device), received


def combine(
    comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle,
    out: torch.Tensor | None, *, use_logfmt: bool = False,
) -> tuple[torch.Tensor, EventOverlap, Callable[[], None]]:
    """Return expert outputs to their tokens' ranks and reduce with weights; see ``hal.ep.Buffer.low_latency_combine``."""
    op = "Buffer.low_latency_combine"
    me, world = comm.rank, comm.world

    def prepare() -> tuple[dict[str, int], _Send]:
        check_handle(op, handle, LowLatencyHandle, comm)
        local, num_slots, hidden = handle.num_experts // world, world * handle.num_max_dispatch_tokens_per_rank, handle.hidden
        expect_tensor(op, "x", x, dtypes=torch.bfloat16, shape=(local, num_slots, hidden), dims=("num_local_experts", "num_ranks * num_max_dispatch_tokens_per_rank", "hidden"))
        check_device(op, "x", x, comm)
        expect_tensor(op, "topk_idx", topk_idx, dtypes=torch.int64, shape=(None, None), dims=("num_combined_tokens", "num_topk"))
        num_tokens = topk_idx.shape[0]
        _check_count(op, num_tokens, handle.num_max_dispatch_tokens_per_rank)
        check_topk(op, topk_idx, num_tokens, handle.num_experts, comm)
        check_weights(op, topk_weights, topk_idx, comm)
        if out is not None:
            expect_tensor(op, "out", out, dtypes=torch.bfloat16, shape=(num_tokens, hidden), dims=("num_combined_tokens", "hidden"))
            check_device(op, "out", out, comm)
        counts = handle.counts()  # [local expert, source rank]
        source = torch.arange(world, device=x.device).repeat(local).repeat_interleave(counts.flatten())
        bucket = torch.full((local, num_slots), -1, dtype=torch.int64, device=x.device)
        bucket[torch.arange(num_slots, device=x.device) < counts.sum(dim=1, keepdim=True)] = source
        if use_logfmt and hidden % BLOCK:
            raise ShapeError(op, "x", f"hidden a multiple of {BLOCK} with use_logfmt", f"hidden={hidden}", "Pass use_logfmt=False.")
        # LogFMT rows are int16 words; they travel as bf16-typed words (the dtype every transport moves).
        payload = logfmt_encode(x.reshape(local * num_slots, hidden)).view(torch.bfloat16) if use_logfmt else x.view(local * num_slots, hidden)
        outgoing = comm.prepare_rows([Field("x", payload.dtype, (payload.shape[1],))], {"x": payload}, bucket.view(-1, 1), world)
        token, weight, per_expert = _expert_major(topk_idx, topk_weights, handle.num_experts)
        announced = per_expert.tolist() + counts.t().flatten().tolist()
        facts = {"hidden": hidden, "num_experts": handle.num_experts, "max_tokens": handle.num_max_dispatch_tokens_per_rank, "dispatch": handle.dispatch_id,
                 "use_logfmt": int(use_logfmt)}
        return facts, _Send(outgoing, announced, (token, weight))

    send = agree(comm, op, prepare).plan
    assert send.owner_order is not None
    local, experts = handle.num_experts // world, handle.num_experts
    table = comm.all_gather_ints(send.announced, "expert counts")
    routed = table[:, :experts].view(world, world, local)  # [source, expert rank, local expert] from topk_idx
    held = table[:, experts:].view(world, world, local).transpose(0, 1)  # [source, expert rank, local expert] from handles
    if not torch.equal(routed, held):
        source, rank, expert = (int(i) for i in (routed != held).nonzero()[0])
        raise EPMismatchError(
            f"{op}: rank {source} routes {int(routed[source, rank, expert])} tokens to expert {rank * local + expert} but rank {rank}'s handle "
            f"holds {int(held[source, rank, expert])} from it. Pass every rank the topk_idx of the low_latency_dispatch whose handle it passes."
        )
    rows = comm.exchange(send.outgoing, held[:, me].sum(dim=1).tolist(), routed[me].sum(dim=1).tolist(), "tokens", in_place=True)["x"]  # reduced at once
    token, weight = send.owner_order
    if use_logfmt:  # decode to float32 and reduce there; one rounding to bf16
        combined = ep_combine_reduce(logfmt_decode(rows.view(torch.int16), handle.hidden), token, topk_idx.shape[0], weight).to(torch.bfloat16)
    else:
        combined = ep_combine_reduce(rows, token, topk_idx.shape[0], weight)
    if out is not None:
        combined = out.copy_(combined)
    return combined, capture(x.device), received
