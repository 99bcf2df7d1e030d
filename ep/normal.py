"""Normal (high-throughput) dispatch and combine over torch.distributed, with DeepEP's semantics.

Verified against deepseek-ai/DeepEP (``deep_ep/buffer.py``, ``csrc/kernels/intranode.cu``,
``tests/test_intranode.py`` at 567632d, the last commit before EPv2):

- A token goes once to every rank with ``is_token_in_rank[t, r]``; rank r receives its tokens
  ordered by source rank, then source token index (each (source rank, channel) queue is read in
  order and ``rank_prefix_matrix[i][r]`` bounds source i's rows).
- The sender rewrites ``topk_idx`` per destination: ``idx - r * E / R`` when the expert lives on
  r, else -1, and zeroes the weight where the index became -1 (done here by the receiver, with
  the same result).
- ``num_recv_tokens_per_expert_list`` sums every source's ``num_tokens_per_expert`` for the local
  experts and rounds each up to ``expert_alignment``; with ``num_worst_tokens`` the outputs are
  padded to that many rows (``topk_idx`` -1) and the list is empty.
- Cached dispatch (``handle=`` given) takes no top-k arguments and returns
  ``(recv_x, None, None, None, None, event)``.
- Combine sends each received row back and the owner sums the copies of a token in float32
  (no expert weights); ``topk_weights`` are summed the same way ("reduced top-k weights").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hal.checks import expect_int, expect_tensor
from hal.ep.agreement import DTYPE_CODES, agree, scale_form
from hal.ep.checks import TOKEN_DTYPES, check_device, check_experts, check_handle, check_tokens, check_topk, check_weights
from hal.ep.comm import Communicator, Outgoing
from hal.ep.errors import EPError
from hal.ep.event import EventOverlap, capture
from hal.ep.handle import DispatchHandle
from hal.ep.message import Field
from hal.errors import DTypeError, HalError, ShapeError, ValueRangeError
from hal.ops.ep import NVL_PEERS_PER_NODE, get_dispatch_layout
from hal.ops.ep_local import ep_combine_reduce, reads_row_segments

__all__ = ["dispatch_layout", "dispatch", "cached_dispatch", "combine"]

Tokens = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Send:
    """A prepared dispatch: the messages, in the communicator's form, and the counts to announce."""

    outgoing: Outgoing
    announced: list[int]  # rows per destination rank [R], then tokens per expert [E]
    is_token_in_rank: torch.Tensor | None = None  # a fresh dispatch's map, kept in its handle


def _token_fields(data: torch.Tensor, scales: torch.Tensor | None) -> list[Field]:
    hidden = data.shape[1]
    scale = [Field("x_scales", scales.dtype, (scales.shape[1],))] if scales is not None else []
    return scale + [Field("src", torch.int32, ()), Field("x", data.dtype, (hidden,))]


def _destinations(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """int64 [N, R]: rank r in column r where the token goes there, else -1 (ep_pack's buckets)."""
    ranks = torch.arange(is_token_in_rank.shape[1], device=is_token_in_rank.device)
    return torch.where(is_token_in_rank, ranks, -1)


def _rank_counts(handle: DispatchHandle) -> torch.Tensor:
    """int64 [R, R] tokens from rank i to rank j, recovered from the prefix matrix."""
    prefix = handle.rank_prefix_matrix.long().cpu()
    return torch.cat([prefix[:1], prefix[1:] - prefix[:-1]])


def _pad(tensor: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor
    filler = torch.full((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, filler])


def _check_layout(
    op: str, comm: Communicator, num_tokens: int, is_token_in_rank: torch.Tensor | None, num_tokens_per_rank: torch.Tensor | None,
    num_tokens_per_rdma_rank: torch.Tensor | None, num_tokens_per_expert: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of :meth:`hal.ep.Buffer.get_dispatch_layout`, self-consistent; returns (is_token_in_rank, num_tokens_per_expert)."""
    world = comm.world
    expect_tensor(op, "is_token_in_rank", is_token_in_rank, dtypes=torch.bool, shape=(num_tokens, world), dims=("num_tokens", "num_ranks"))
    expect_tensor(op, "num_tokens_per_rank", num_tokens_per_rank, dtypes=torch.int32, shape=(world,), dims=("num_ranks",))
    expect_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, dtypes=torch.int32, shape=(None,), dims=("num_experts",))
    assert is_token_in_rank is not None and num_tokens_per_rank is not None and num_tokens_per_expert is not None
    for name, tensor in (("is_token_in_rank", is_token_in_rank), ("num_tokens_per_rank", num_tokens_per_rank), ("num_tokens_per_expert", num_tokens_per_expert)):
        check_device(op, name, tensor, comm)
    check_experts(op, num_tokens_per_expert.shape[0], comm)
    sent = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    if not torch.equal(sent.cpu(), num_tokens_per_rank.cpu()):
        raise ValueRangeError(
            op, "num_tokens_per_rank", f"is_token_in_rank.sum(0) = {sent.tolist()}", str(num_tokens_per_rank.tolist()),
            "Pass the num_tokens_per_rank and is_token_in_rank of one get_dispatch_layout call.",
        )
    if num_tokens_per_rdma_rank is not None:
        nodes = max(world // NVL_PEERS_PER_NODE, 1)
        expect_tensor(op, "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtypes=torch.int32, shape=(nodes,), dims=("num_nodes",))
        per_node = is_token_in_rank.view(num_tokens, nodes, -1).any(dim=2).sum(dim=0, dtype=torch.int32)
        if not torch.equal(per_node.cpu(), num_tokens_per_rdma_rank.cpu()):
            raise ValueRangeError(
                op, "num_tokens_per_rdma_rank", f"tokens per node of is_token_in_rank = {per_node.tolist()}",
                str(num_tokens_per_rdma_rank.tolist()), "Pass the layout of one get_dispatch_layout call.",
            )
    return is_token_in_rank, num_tokens_per_expert


def _check_routing(op: str, topk_idx: torch.Tensor, is_token_in_rank: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> None:
    """The layout must match topk_idx: per-expert counts, and no token kept from a rank holding its expert."""
    num_experts = num_tokens_per_expert.shape[0]
    selected = topk_idx >= 0
    counted = torch.bincount(topk_idx[selected], minlength=num_experts).to(torch.int32)
    if not torch.equal(counted.cpu(), num_tokens_per_expert.cpu()):
        expert = int((counted != num_tokens_per_expert).nonzero()[0])
        raise ValueRangeError(
            op, "num_tokens_per_expert", f"the selections in topk_idx ({int(counted[expert])} for expert {expert})",
            f"{int(num_tokens_per_expert[expert])} for expert {expert}", "Pass the layout get_dispatch_layout computed from this topk_idx.",
        )
    experts_per_rank = num_experts // is_token_in_rank.shape[1]
    owner = torch.where(selected, topk_idx // experts_per_rank, 0)
    dropped = selected & ~is_token_in_rank.gather(1, owner)
    if bool(dropped.any()):
        token, slot = (int(i) for i in dropped.nonzero()[0])
        raise ValueRangeError(
            op, "is_token_in_rank", f"True where a token's expert lives (token {token}'s expert {int(topk_idx[token, slot])} is on rank {int(owner[token, slot])})",
            f"False at [{token}, {int(owner[token, slot])}] ({int(dropped.sum())} selections would be dropped)",
            "Pass the layout get_dispatch_layout computed from this topk_idx.",
        )


def dispatch_layout(
    comm: Communicator, topk_idx: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
    """:func:`hal.get_dispatch_layout` for this group, agreed by every rank; see ``hal.ep.Buffer.get_dispatch_layout``."""
    op = "Buffer.get_dispatch_layout"

    def prepare() -> tuple[dict[str, int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        check_experts(op, num_experts, comm)
        expect_tensor(op, "topk_idx", topk_idx, dtypes=torch.int64, shape=(None, None), dims=("num_tokens", "num_topk"))
        check_topk(op, topk_idx, topk_idx.shape[0], num_experts, comm)
        return {"num_experts": num_experts}, get_dispatch_layout(topk_idx, num_experts, comm.world)

    layout = agree(comm, op, prepare).plan
    return (*layout, capture(topk_idx.device))


def dispatch(
    comm: Communicator, x: Tokens, *, num_tokens_per_rank: torch.Tensor | None, num_tokens_per_rdma_rank: torch.Tensor | None,
    is_token_in_rank: torch.Tensor | None, num_tokens_per_expert: torch.Tensor | None, topk_idx: torch.Tensor | None,
    topk_weights: torch.Tensor | None, expert_alignment: int, num_worst_tokens: int,
) -> tuple[Tokens, torch.Tensor | None, torch.Tensor | None, list[int], DispatchHandle, EventOverlap]:
    """Send each token to the ranks in ``is_token_in_rank``; see ``hal.ep.Buffer.dispatch``."""
    op = "Buffer.dispatch"
    me, world = comm.rank, comm.world

    def prepare() -> tuple[dict[str, int], _Send]:
        data, scales = check_tokens(op, x, comm)
        num_tokens, hidden = data.shape
        in_rank, per_expert = _check_layout(op, comm, num_tokens, is_token_in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert)
        num_experts = per_expert.shape[0]
        expect_int(op, "expert_alignment", expert_alignment, minimum=1)
        expect_int(op, "num_worst_tokens", num_worst_tokens, minimum=0)
        if (topk_idx is None) != (topk_weights is None):
            raise DTypeError(op, "topk_weights", "topk_idx and topk_weights both given or both None", "only one of them", "Pass both, or neither.")
        fields = _token_fields(data, scales)
        message = {"x": data, "src": torch.arange(num_tokens, dtype=torch.int32, device=data.device)}
        facts = {"hidden": hidden, "dtype": DTYPE_CODES[data.dtype], "with_topk": int(topk_idx is not None), "num_experts": num_experts,
                 "num_worst_tokens": num_worst_tokens, "scales": scale_form(scales)}
        if scales is not None:
            message["x_scales"] = scales
        if topk_idx is not None:
            check_topk(op, topk_idx, num_tokens, num_experts, comm)
            _check_routing(op, topk_idx, in_rank, per_expert)
            num_topk = topk_idx.shape[1]
            fields = [Field("topk_idx", torch.int64, (num_topk,)), Field("topk_weights", torch.float32, (num_topk,))] + fields
            message |= {"topk_idx": topk_idx, "topk_weights": check_weights(op, topk_weights, topk_idx, comm)}
            facts["num_topk"] = num_topk
        outgoing = comm.prepare_rows(fields, message, _destinations(in_rank), world)
        assert outgoing.counts is not None
        return facts, _Send(outgoing, outgoing.counts.tolist() + per_expert.tolist(), in_rank)

    agreed = agree(comm, op, prepare)
    send = agreed.plan
    table = comm.all_gather_ints(send.announced, "layout counts")  # [R, R + E]
    rank_counts, expert_counts = table[:, :world], table[:, world:]
    _check_worst(op, rank_counts, agreed.shared("num_worst_tokens"))
    got = comm.exchange(send.outgoing, rank_counts[me].tolist(), rank_counts[:, me].tolist(), "tokens")
    recv_x: Tokens = (got["x"], got["x_scales"]) if "x_scales" in got else got["x"]
    local_experts = expert_counts.shape[1] // world
    announced = expert_counts[:, me * local_experts : (me + 1) * local_experts].sum(dim=0)
    recv_topk_idx = recv_topk_weights = None
    if "topk_idx" in got:
        recv_topk_idx, recv_topk_weights = _localise(got["topk_idx"], got["topk_weights"], me * local_experts, local_experts)
        received = torch.bincount(recv_topk_idx[recv_topk_idx >= 0], minlength=local_experts).cpu()
        if not torch.equal(received, announced):
            raise EPError(
                f"{op} on rank {me}: received {received.tolist()} selections per local expert, the senders announced "
                f"{announced.tolist()}; the transport lost or duplicated tokens."
            )
    per_expert = [-(-int(c) // expert_alignment) * expert_alignment for c in announced.tolist()]
    num_recv_rows = got["src"].shape[0]
    if num_worst_tokens:
        num_recv_rows, per_expert = num_worst_tokens, []
        recv_x = _pad_tokens(recv_x, num_worst_tokens)
        if recv_topk_idx is not None and recv_topk_weights is not None:
            recv_topk_idx, recv_topk_weights = _pad(recv_topk_idx, num_worst_tokens, -1), _pad(recv_topk_weights, num_worst_tokens, 0.0)
    device = got["src"].device
    prefix = rank_counts.cumsum(dim=0).to(torch.int32).to(device)
    handle = DispatchHandle.one_channel(prefix, got["src"], send.is_token_in_rank, send.outgoing.src_idx, num_recv_rows, agreed.number, comm.owner)
    return recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, capture(device)


def _check_worst(op: str, rank_counts: torch.Tensor, num_worst_tokens: list[int]) -> None:
    """Each rank's num_worst_tokens (0: unused) must cover what it receives; every rank sees every count, so all raise alike."""
    for rank, worst in enumerate(num_worst_tokens):
        receiving = int(rank_counts[:, rank].sum())
        if 0 < worst < receiving:
            raise ValueRangeError(
                op, "num_worst_tokens", f"at least the {receiving} tokens rank {rank} receives", f"{worst} on rank {rank}",
                "Size num_worst_tokens for the worst case (num_tokens * num_ranks), or pass 0.",
            )


def _localise(topk_idx: torch.Tensor, topk_weights: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids -> this rank's local ids (-1 for experts elsewhere, weight 0 there)."""
    here = (topk_idx >= first) & (topk_idx < first + count)
    return torch.where(here, topk_idx - first, -1), torch.where(here, topk_weights, 0.0)


def _pad_tokens(tokens: Tokens, rows: int) -> Tokens:
    if isinstance(tokens, tuple):
        return _pad(tokens[0].view(torch.uint8), rows, 0).view(tokens[0].dtype), _pad(tokens[1], rows, 0)
    return _pad(tokens, rows, 0.0)


def cached_dispatch(
    comm: Communicator, x: Tokens, handle: DispatchHandle, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None
) -> tuple[Tokens, None, None, None, None, EventOverlap]:
    """Dispatch ``x`` along the layout of an earlier dispatch; see ``hal.ep.Buffer.dispatch``."""
    op = "Buffer.dispatch (cached)"
    me = comm.rank

    def prepare() -> tuple[dict[str, int], _Send]:
        check_handle(op, handle, DispatchHandle, comm)
        if topk_idx is not None or topk_weights is not None:
            raise DTypeError(
                op, "topk_idx", "None with a handle (the routing comes from the handle)", "a tensor",
                "Pass topk_idx/topk_weights only to the dispatch that makes the handle, as in DeepEP.",
            )
        data, scales = check_tokens(op, x, comm)
        num_tokens = handle.is_token_in_rank.shape[0]
        if data.shape[0] != num_tokens:
            raise ShapeError(
                op, "x", f"{num_tokens} tokens (as many as the dispatch that made the handle)", f"{data.shape[0]} tokens",
                "A cached dispatch reuses the layout: pass the same tokens' new values, or dispatch without a handle.",
            )
        message = {"x": data, "src": torch.arange(num_tokens, dtype=torch.int32, device=data.device)}
        if scales is not None:
            message["x_scales"] = scales
        outgoing = comm.prepare_rows(_token_fields(data, scales), message, _destinations(handle.is_token_in_rank), comm.world)
        facts = {"hidden": data.shape[1], "dtype": DTYPE_CODES[data.dtype], "dispatch": handle.dispatch_id, "scales": scale_form(scales)}
        return facts, _Send(outgoing, [])

    send = agree(comm, op, prepare).plan
    counts = _rank_counts(handle)
    got = comm.exchange(send.outgoing, counts[me].tolist(), counts[:, me].tolist(), "tokens")
    recv_x: Tokens = (got["x"], got["x_scales"]) if "x_scales" in got else got["x"]
    return _pad_tokens(recv_x, handle.num_recv_rows), None, None, None, None, capture(got["x"].device)


def _reduction_reads_segments(device: torch.device) -> bool:
    """Whether the backend that will run ``ep_combine_reduce`` on ``device`` takes rows in segments."""
    try:
        return reads_row_segments(device.type, device_arg="x")
    except HalError:  # the reduction's own call raises it, typed, where it belongs
        return False


def combine(
    comm: Communicator, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None, bias: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
    """Send received rows back and sum each token's copies; see ``hal.ep.Buffer.combine``."""
    op = "Buffer.combine"
    me = comm.rank

    def prepare() -> tuple[dict[str, int], _Send]:
        check_handle(op, handle, DispatchHandle, comm)
        rows = handle.num_recv_rows
        expect_tensor(op, "x", x, dtypes=TOKEN_DTYPES, shape=(rows, None), dims=("num_recv_tokens", "hidden"))
        check_device(op, "x", x, comm)
        received = handle.num_recv_tokens
        fields = [Field("x", x.dtype, (x.shape[1],))]
        message = {"x": x[:received]}
        num_tokens = handle.is_token_in_rank.shape[0]
        for i, b in enumerate(bias):
            expect_tensor(op, f"bias[{i}]", b, dtypes=x.dtype, shape=(num_tokens, x.shape[1]), dims=("num_tokens", "hidden"))
            check_device(op, f"bias[{i}]", b, comm)
        facts = {"hidden": x.shape[1], "dtype": DTYPE_CODES[x.dtype], "with_weights": int(topk_weights is not None), "dispatch": handle.dispatch_id}
        if topk_weights is not None:
            expect_tensor(op, "topk_weights", topk_weights, dtypes=torch.float32, shape=(rows, None), dims=("num_recv_tokens", "num_topk"))
            check_device(op, "topk_weights", topk_weights, comm)
            fields.insert(0, Field("topk_weights", torch.float32, (topk_weights.shape[1],)))
            message["topk_weights"] = topk_weights[:received]
            facts["num_topk"] = topk_weights.shape[1]
        return facts, _Send(comm.prepare_rows(fields, message), [])

    send = agree(comm, op, prepare).plan
    counts = _rank_counts(handle)
    # Received rows are grouped by source rank already: they go back in the order they came.
    # Reduced at once. Where the reduction reads rows in segments, this rank's own rows stay in x
    # (a transport may then hand them over in place) instead of being copied beside the others.
    keep_own = not bias and _reduction_reads_segments(x.device)
    got = comm.exchange(send.outgoing, counts[:, me].tolist(), counts[me].tolist(), "tokens", in_place=True, keep_own=keep_own)
    num_tokens = handle.is_token_in_rank.shape[0]
    if bias:  # the biases join the float32 sum, then one rounding (DeepEP adds them in its kernel)
        total = ep_combine_reduce(got["x"].float(), handle.send_src_idx, num_tokens)
        combined_x = (total + sum(b.float() for b in bias)).to(x.dtype)
    else:
        combined_x = ep_combine_reduce(got["x"], handle.send_src_idx, num_tokens)
    combined_weights = ep_combine_reduce(got["topk_weights"], handle.send_src_idx, num_tokens) if "topk_weights" in got else None
    return combined_x, combined_weights, capture(x.device)
