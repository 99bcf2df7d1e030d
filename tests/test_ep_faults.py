"""A rank that stalls or dies: the others raise ``EPTimeoutError`` naming the operation, within the
Buffer's timeout, and never hang; the Buffer refuses to communicate afterwards. Each fault runs on
the shared-memory transport and on torch.distributed; no shared-memory segment survives either."""

from __future__ import annotations

import os
import time

import pytest
import torch

import hal
from hal.ep.launch import run_local

TIMEOUT_S = 2.0
SLACK_S = 3.0  # scheduling on a loaded two-core machine
TRANSPORTS = pytest.mark.parametrize("transport", ["shm", "torch"])


@pytest.fixture(autouse=True)
def no_leftover_segments():
    """Whatever a test does to its ranks, hal leaves nothing behind in /dev/shm."""
    from hal.ep.shm import leftover_segments

    before = set(leftover_segments())
    yield
    assert set(leftover_segments()) <= before, f"leaked: {sorted(set(leftover_segments()) - before)}"


def _inputs(rank: int):
    x = torch.full((4, 128), float(rank), dtype=torch.bfloat16)
    topk_idx = torch.tensor([[0, 1], [1, -1], [2, 3], [-1, -1]])
    return x, topk_idx, torch.rand(4, 2)


def _warm_up(world: int) -> None:
    """Select every local EP operator once before the short deadlines start: in a fresh cache the
    first selection proves the OpenCL runtime in a child process (seconds), which is not what
    these tests time."""
    from hal.ops.ep_local import ep_combine_reduce, ep_pack, ep_unpack

    x, topk_idx, weights = _inputs(0)
    hal.get_dispatch_layout(topk_idx, 2 * world, world)
    packed, src_idx, _ = ep_pack(x, topk_idx, 2 * world)
    ep_unpack(packed, torch.zeros(packed.shape[0], dtype=torch.int32), 1, packed.shape[0])
    ep_combine_reduce(packed, src_idx, x.shape[0])


def _outcome(call) -> dict:
    start = time.monotonic()
    try:
        call()
    except Exception as exc:  # the test inspects what was raised and when
        return {"raised": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - start}
    return {"raised": "none", "message": "", "elapsed": time.monotonic() - start}


def stall_in_dispatch(rank: int, world: int) -> dict:
    _warm_up(world)
    buffer = hal.ep.Buffer()  # the timeout comes from HAL_EP_TIMEOUT_S
    x, topk_idx, weights = _inputs(rank)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 2 * world)
    layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    if rank == world - 1:
        time.sleep(2 * TIMEOUT_S + 1)  # the peers give up meanwhile
    first = _outcome(lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout))
    later = _outcome(lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout))
    return {"first": first, "later": later, "timeout_s": buffer.timeout_s}


def stall_between_header_and_payload(rank: int, world: int) -> dict:
    """The last rank stalls after the ranks agreed on the header, before its payload exchange:
    its peers give up on the payload, and its own exchange would then complete against the work
    they abandoned."""
    _warm_up(world)
    buffer = hal.ep.Buffer()
    x, topk_idx, weights = _inputs(rank)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 2 * world)
    layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    if rank == world - 1:
        comm = buffer.transport.comm
        exchange = comm.exchange

        def stalled(*args, **kwargs):
            time.sleep(TIMEOUT_S + 1.0)
            return exchange(*args, **kwargs)

        comm.exchange = stalled
    return {"first": _outcome(lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout))}


@TRANSPORTS
def test_no_rank_reports_success_for_an_exchange_its_peers_abandoned(transport):
    outcomes = run_local(stall_between_header_and_payload, 3, timeout_s=90, env={"HAL_EP_TIMEOUT_S": str(TIMEOUT_S), "HAL_EP_TRANSPORT": transport})
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        first = outcome.value["first"]
        assert first["raised"] == "EPTimeoutError", (outcome.rank, first)
        assert first["elapsed"] <= TIMEOUT_S + SLACK_S + 1.0, (outcome.rank, first)


def die_before_low_latency_combine(rank: int, world: int) -> dict:
    _warm_up(world)
    buffer = hal.ep.Buffer(timeout_s=TIMEOUT_S * 5)
    x, topk_idx, weights = _inputs(rank)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, 4, 2 * world, use_fp8=False)
    if rank == 1:
        os._exit(7)
    return {"first": _outcome(lambda: buffer.low_latency_combine(recv_x, topk_idx, weights, handle)), "timeout_s": buffer.timeout_s}


@TRANSPORTS
def test_a_stalled_rank_makes_the_others_time_out_within_the_bound(transport):
    outcomes = run_local(stall_in_dispatch, 3, timeout_s=90, env={"HAL_EP_TIMEOUT_S": str(TIMEOUT_S), "HAL_EP_TRANSPORT": transport})
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes[:2]:
        first, later = outcome.value["first"], outcome.value["later"]
        assert outcome.value["timeout_s"] == TIMEOUT_S
        assert first["raised"] == "EPTimeoutError" and "Buffer.dispatch on rank" in first["message"], first
        assert TIMEOUT_S - 0.1 <= first["elapsed"] <= TIMEOUT_S + SLACK_S, first
        assert later["raised"] == "EPError" and "cannot communicate" in later["message"], later
    # The rank that stalled never reports success for the exchange its peers abandoned.
    stalled = outcomes[2].value["first"]
    assert stalled["raised"] == "EPTimeoutError", stalled
    assert stalled["elapsed"] <= TIMEOUT_S + SLACK_S, stalled


@pytest.mark.parametrize("value", ["inf", "1e20", "nan", "-3", "0", "soon"])
def test_an_unbounded_or_invalid_ep_timeout_is_refused(value, monkeypatch):
    from hal.ep.comm import resolve_timeout
    from hal.ep.errors import EPError

    monkeypatch.setenv("HAL_EP_TIMEOUT_S", value)
    with pytest.raises(EPError, match="HAL_EP_TIMEOUT_S"):
        resolve_timeout(None)
    with pytest.raises(EPError, match="timeout_s"):
        resolve_timeout(float("inf"))


@TRANSPORTS
def test_a_dead_rank_makes_the_others_fail_at_once_naming_the_operation(transport):
    outcomes = run_local(die_before_low_latency_combine, 3, timeout_s=90, env={"HAL_EP_TRANSPORT": transport})
    assert outcomes[1].exitcode == 7
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.exitcode == 0, (outcome.rank, outcome.error)
        first = outcome.value["first"]
        assert first["raised"] == "EPTimeoutError" and "Buffer.low_latency_combine" in first["message"], first
        assert first["elapsed"] <= outcome.value["timeout_s"] + SLACK_S, first
