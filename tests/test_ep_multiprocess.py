"""``hal.ep.Buffer`` across 1, 2 and 4 gloo processes against a single-process reference, on the
shared-memory transport and on torch.distributed.

Each world size is launched once (``hal.ep.launch.run_local``): every rank runs the same script of
Buffer calls on inputs regenerated here from seeds, and returns what it received; the tests
rebuild the expected results from all ranks' inputs with plain loops. Routing leaves rank 0's
experts unchosen (rank 0 receives nothing when there are other ranks), gives rank 2 no tokens,
sets some top-k slots to -1 and routes some tokens nowhere. The same launch then makes one rank
pass a bad argument in each of several ways and records what every rank raised.
"""

from __future__ import annotations

import pytest
import torch

import hal
from hal.ep.launch import run_local
from hal.ep.low_latency import cast_fp8

HIDDEN, EXPERTS_PER_RANK, TOPK, ALIGNMENT = 256, 4, 4, 4
TOKENS = (6, 9, 0, 5)  # per rank, by rank % 4


def rank_inputs(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tokens and routing, the same wherever they are regenerated."""
    gen = torch.Generator().manual_seed(100 * world + rank)
    num_tokens, num_experts = TOKENS[rank % 4], EXPERTS_PER_RANK * world
    allowed = torch.arange(EXPERTS_PER_RANK if world > 1 else 0, num_experts)  # rank 0's experts idle when world > 1
    topk_idx = torch.stack([allowed[torch.randperm(allowed.numel(), generator=gen)[:TOPK]] for _ in range(num_tokens)]) if num_tokens else torch.empty(0, TOPK, dtype=torch.int64)
    topk_idx[torch.rand(num_tokens, TOPK, generator=gen) < 0.25] = -1
    if num_tokens > 3:
        topk_idx[2] = -1  # a token routed nowhere
    x = (torch.randn(num_tokens, HIDDEN, generator=gen) * torch.rand(num_tokens, 1, generator=gen) * 4).to(torch.bfloat16)
    return {"x": x, "topk_idx": topk_idx, "topk_weights": torch.rand(num_tokens, TOPK, generator=gen)}


def expert_scale(expert: torch.Tensor) -> torch.Tensor:
    """A per-expert factor standing in for an expert's computation in low-latency mode."""
    return (expert.float() + 1) / 8


def attempt(call) -> list[str]:
    try:
        call()
    except Exception as exc:  # the tests compare the type and message on every rank
        return [type(exc).__name__, str(exc)]
    return ["none", ""]


def run_script(rank: int, world: int) -> dict:
    """Every rank: layout, dispatch (bf16, cached fp8, fp8 padded, no top-k), combine, low latency, then errors."""
    buffer = hal.ep.Buffer(timeout_s=60)
    inp = rank_inputs(rank, world)
    x, topk_idx, weights = inp["x"], inp["topk_idx"], inp["topk_weights"]
    num_experts, out = EXPERTS_PER_RANK * world, {"transport": buffer.transport.name}
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    out["layout"] = [per_rank, per_expert, in_rank, per_node is None]
    recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, expert_alignment=ALIGNMENT, **layout)
    event.current_stream_wait()
    out["dispatch"] = [recv_x, recv_idx, recv_w, counts, handle.rank_prefix_matrix, handle.recv_src_idx]
    expert_out = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
    out["combine"] = list(buffer.combine(expert_out, handle, topk_weights=recv_w)[:2])
    x_fp8 = hal.per_token_cast_to_fp8(x)
    out["cached_fp8"] = list(buffer.dispatch(x_fp8, handle=handle)[:5])
    worst = sum(TOKENS[r % 4] for r in range(world))
    padded = buffer.dispatch(x_fp8, topk_idx=topk_idx, topk_weights=weights, num_worst_tokens=worst, **layout)
    out["fp8_worst"] = [padded[0][0], padded[0][1], padded[1], padded[2], padded[3]]
    out["no_topk"] = list(buffer.dispatch(x, **layout)[:4])
    max_tokens = max(TOKENS)
    for use_fp8 in (False, True):
        stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32)
        ll_x, ll_count, ll_handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, max_tokens, num_experts, use_fp8=use_fp8, cumulative_local_expert_recv_stats=stats, return_recv_hook=True
        )
        hook()
        values = hal.ops.fp8_quant.dequantize_per_token(*ll_x) if use_fp8 else ll_x.float()
        experts = torch.arange(EXPERTS_PER_RANK) + rank * EXPERTS_PER_RANK
        y = (values * expert_scale(experts).view(-1, 1, 1)).to(torch.bfloat16)
        combined = torch.full((x.shape[0], HIDDEN), float("nan"), dtype=torch.bfloat16)
        result = buffer.low_latency_combine(y, topk_idx, weights, ll_handle, out=combined)[0]
        out[f"ll_{'fp8' if use_fp8 else 'bf16'}"] = [ll_x, ll_count, ll_handle[0], ll_handle[1], stats, combined, result.data_ptr() == combined.data_ptr()]
    if world > 1:
        out["errors"] = run_errors(buffer, rank, world, inp, layout, handle, recv_x)
    return out


def run_errors(buffer, rank: int, world: int, inp: dict, layout: dict, handle, recv_x) -> dict[str, list[str]]:
    """One rank (the last, which has tokens and receives some) passes a bad argument; all record what they raised."""
    x, topk_idx, weights, num_experts = inp["x"], inp["topk_idx"], inp["topk_weights"], EXPERTS_PER_RANK * world
    bad = rank == world - 1
    wrong = topk_idx.clone()
    if bad:
        wrong[0, 0] = num_experts
    twice = topk_idx.clone()
    if bad:
        twice[0, :2] = num_experts - 1
    other_counts = layout["num_tokens_per_expert"].roll(1) if bad else layout["num_tokens_per_expert"]
    second = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)[4]
    ll_x, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max(TOKENS), num_experts, use_fp8=False)
    ll_topk = topk_idx.clone()
    if bad:
        ll_topk[ll_topk >= 0] = -1  # drops selections the experts' handles hold
    errors = {
        "hidden differs": attempt(lambda: buffer.dispatch(x[:, :128] if bad else x, topk_idx=topk_idx, topk_weights=weights, **layout)),
        "dtype differs": attempt(lambda: buffer.dispatch(x.half() if bad else x, topk_idx=topk_idx, topk_weights=weights, **layout)),
        "expert out of range": attempt(lambda: buffer.get_dispatch_layout(wrong, num_experts)),
        "expert twice on a row": attempt(lambda: buffer.get_dispatch_layout(twice, num_experts)),
        "layout of other routing": attempt(lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **{**layout, "num_tokens_per_expert": other_counts})),
        "cached with other tokens": attempt(lambda: buffer.dispatch(x[:-1] if bad else x, handle=handle)),
        "handles of two dispatches": attempt(lambda: buffer.combine(recv_x, handle if bad else second)),
        "combine rows differ": attempt(lambda: buffer.combine(recv_x[:-1] if bad else recv_x, handle)),
        "too many low-latency tokens": attempt(lambda: buffer.low_latency_dispatch(x, topk_idx, x.shape[0] - 1 if bad else max(TOKENS), num_experts)),
        "low-latency combine of other routing": attempt(lambda: buffer.low_latency_combine(ll_x, ll_topk, weights, ll_handle)),
        "different operations": attempt(lambda: buffer.combine(recv_x, handle) if bad else buffer.dispatch(x, handle=handle)),
    }
    errors["still works afterwards"] = attempt(lambda: buffer.combine(recv_x, handle))
    return errors


@pytest.fixture(scope="module", params=[(1, "shm"), (2, "shm"), (4, "shm"), (2, "torch"), (4, "torch")], ids=lambda p: f"world{p[0]}-{p[1]}")
def world(request):
    size, transport = request.param
    outcomes = run_local(run_script, size, timeout_s=150, env={"HAL_EP_TRANSPORT": transport})
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    assert all(o.value["transport"] == transport for o in outcomes)
    return size, [o.value for o in outcomes], [rank_inputs(r, size) for r in range(size)]


def expected_layout(topk_idx: torch.Tensor, world: int) -> torch.Tensor:
    """bool [num_tokens, R] by loops: does a token have an expert on each rank."""
    in_rank = torch.zeros(topk_idx.shape[0], world, dtype=torch.bool)
    for t, row in enumerate(topk_idx.tolist()):
        for e in row:
            if e >= 0:
                in_rank[t, e // EXPERTS_PER_RANK] = True
    return in_rank


def test_layout_is_the_single_process_layout(world):
    size, results, inputs = world
    for rank in range(size):
        per_rank, per_expert, in_rank, no_nodes = results[rank]["layout"]
        want = expected_layout(inputs[rank]["topk_idx"], size)
        assert torch.equal(in_rank, want) and per_rank.tolist() == want.sum(0).tolist() and no_nodes
        assert per_expert.tolist() == [int((inputs[rank]["topk_idx"] == e).sum()) for e in range(EXPERTS_PER_RANK * size)]


def test_dispatch_receives_by_source_rank_then_token_with_local_expert_ids(world):
    size, results, inputs = world
    for me in range(size):
        recv_x, recv_idx, recv_w, counts, prefix, src_idx = results[me]["dispatch"]
        rows, idx, weights, sources, per_source = [], [], [], [], []
        for j in range(size):
            tokens = expected_layout(inputs[j]["topk_idx"], size)[:, me].nonzero().flatten().tolist()
            per_source.append(len(tokens))
            for t in tokens:
                g = inputs[j]["topk_idx"][t]
                mine = (g >= me * EXPERTS_PER_RANK) & (g < (me + 1) * EXPERTS_PER_RANK)
                rows.append(inputs[j]["x"][t])
                idx.append(torch.where(mine, g - me * EXPERTS_PER_RANK, -1))
                weights.append(torch.where(mine, inputs[j]["topk_weights"][t], 0.0))
                sources.append(t)
        assert torch.equal(recv_x, torch.stack(rows) if rows else torch.empty(0, HIDDEN, dtype=torch.bfloat16))
        assert src_idx.tolist() == sources and prefix[:, me].tolist() == torch.tensor(per_source).cumsum(0).tolist()
        if rows:
            assert torch.equal(recv_idx, torch.stack(idx)) and torch.equal(recv_w, torch.stack(weights))
        unaligned = [int((recv_idx == e).sum()) for e in range(EXPERTS_PER_RANK)]
        assert counts == [-(-c // ALIGNMENT) * ALIGNMENT for c in unaligned]
    if size > 1:
        assert results[0]["dispatch"][0].shape[0] == 0, "rank 0's experts are never chosen"


def test_combine_sums_each_tokens_copies_from_every_rank(world):
    size, results, inputs = world
    for me in range(size):
        combined_x, combined_w = results[me]["combine"]
        x, topk_idx = inputs[me]["x"], inputs[me]["topk_idx"]
        in_rank = expected_layout(topk_idx, size)
        want = torch.zeros(x.shape[0], HIDDEN)
        for r in range(size):
            want += in_rank[:, r : r + 1] * (x.float() * (r + 1)).to(torch.bfloat16).float()
        torch.testing.assert_close(combined_x.float(), want.to(torch.bfloat16).float(), rtol=2**-8, atol=0)
        assert torch.equal(combined_w, torch.where(topk_idx >= 0, inputs[me]["topk_weights"], 0.0))


def test_cached_dispatch_moves_fp8_along_the_same_layout(world):
    size, results, _ = world
    for me in range(size):
        (recv_fp8, recv_scales), *nothing = results[me]["cached_fp8"]
        want_fp8, want_scales = hal.per_token_cast_to_fp8(results[me]["dispatch"][0])
        assert nothing == [None, None, None, None]
        assert torch.equal(recv_fp8.view(torch.uint8), want_fp8.view(torch.uint8)) and torch.equal(recv_scales, want_scales)


def test_num_worst_tokens_pads_and_returns_no_counts(world):
    size, results, _ = world
    worst = sum(TOKENS[r % 4] for r in range(size))
    for me in range(size):
        fp8, scales, idx, weights, counts = results[me]["fp8_worst"]
        received = results[me]["dispatch"][0].shape[0]
        assert fp8.shape == (worst, HIDDEN) and scales.shape == (worst, HIDDEN // 128) and counts == []
        assert torch.equal(idx[:received], results[me]["dispatch"][1]) and bool((idx[received:] == -1).all())
        assert torch.equal(weights[received:], torch.zeros(worst - received, TOPK))


def test_dispatch_without_topk_returns_the_tokens_and_counts_only(world):
    size, results, _ = world
    for me in range(size):
        recv_x, idx, weights, counts = results[me]["no_topk"]
        assert torch.equal(recv_x, results[me]["dispatch"][0]) and idx is None and weights is None
        assert sum(counts) == int((results[me]["dispatch"][1] >= 0).sum())


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_low_latency_fills_expert_slots_by_source_rank_then_token(world, mode):
    size, results, inputs = world
    max_tokens = max(TOKENS)
    for me in range(size):
        ll_x, count, src_info, layout_range, stats, _, _ = results[me][f"ll_{mode}"]
        values, scales = (ll_x[0], ll_x[1]) if mode == "fp8" else (ll_x, None)
        assert values.shape == (EXPERTS_PER_RANK, size * max_tokens, HIDDEN)
        for e in range(EXPERTS_PER_RANK):
            g, begin, want_src = me * EXPERTS_PER_RANK + e, 0, []
            for j in range(size):
                tokens = (inputs[j]["topk_idx"] == g).any(dim=1).nonzero().flatten()
                assert int(layout_range[e, j]) >> 32 == begin and int(layout_range[e, j]) & 0xFFFFFFFF == tokens.numel()
                sent = inputs[j]["x"][tokens]
                if mode == "fp8":
                    sent_fp8, sent_scales = cast_fp8(sent, round_scale=False)  # DeepEP's cast, bit for bit
                    assert torch.equal(values[e, begin : begin + tokens.numel()].view(torch.uint8), sent_fp8.view(torch.uint8))
                    assert torch.equal(scales[e, begin : begin + tokens.numel()], sent_scales)
                else:
                    assert torch.equal(values[e, begin : begin + tokens.numel()], sent)
                want_src += tokens.tolist()
                begin += tokens.numel()
            assert int(count[e]) == begin == int(stats[e]) and src_info[e, :begin].tolist() == want_src
            assert bool((src_info[e, begin:] == -1).all())
        if scales is not None:
            assert scales.stride(1) == 1, "scales are column-major in the last two dimensions, as DeepEP returns them"


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_low_latency_combine_is_the_weighted_sum_of_expert_outputs(world, mode):
    size, results, inputs = world
    for me in range(size):
        combined, into_out = results[me][f"ll_{mode}"][5:]
        x, topk_idx, w = inputs[me]["x"], inputs[me]["topk_idx"], inputs[me]["topk_weights"]
        values = hal.ops.fp8_quant.dequantize_per_token(*cast_fp8(x, round_scale=False)) if mode == "fp8" else x.float()
        want = torch.zeros(x.shape[0], HIDDEN)
        for k in range(TOPK):
            chosen = topk_idx[:, k] >= 0
            y = (values * expert_scale(topk_idx[:, k].clamp(min=0)).view(-1, 1)).to(torch.bfloat16).float()
            want += torch.where(chosen, w[:, k], 0.0).view(-1, 1) * y
        assert into_out
        torch.testing.assert_close(combined.float(), want.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


ERRORS = {
    # scenario: (error type on every rank, text in every rank's message)
    "hidden differs": ("ShapeError", "hidden size"),
    "dtype differs": ("DTypeError", "token dtype"),
    "expert out of range": ("ValueRangeError", "expert ids"),
    "expert twice on a row": ("ValueRangeError", "twice on row 0"),
    "layout of other routing": ("ValueRangeError", "num_tokens_per_expert"),
    "cached with other tokens": ("ShapeError", "handle"),
    "handles of two dispatches": ("ValueRangeError", "handle from the same dispatch"),
    "combine rows differ": ("ShapeError", "num_recv_tokens"),
    "too many low-latency tokens": ("ValueRangeError", "num_max_dispatch_tokens_per_rank"),
    "low-latency combine of other routing": ("EPMismatchError", "topk_idx of the low_latency_dispatch"),
    "different operations": ("EPMismatchError", "not running the same Buffer operation"),
}


@pytest.mark.parametrize("scenario", list(ERRORS))
def test_bad_input_on_one_rank_raises_on_every_rank(world, scenario):
    size, results, _ = world
    if size == 1:
        pytest.skip("needs peers")
    kind, text = ERRORS[scenario]
    for rank in range(size):
        raised, message = results[rank]["errors"][scenario]
        assert raised == kind and text in message, (rank, raised, message)
        if kind != "EPMismatchError" and rank != size - 1 and scenario not in ("hidden differs", "dtype differs", "handles of two dispatches"):
            assert f"on rank {size - 1}" in message, "peers name the rank whose argument was wrong"


def test_buffer_still_works_after_the_errors(world):
    size, results, _ = world
    if size > 1:
        assert all(results[r]["errors"]["still works afterwards"] == ["none", ""] for r in range(size))
