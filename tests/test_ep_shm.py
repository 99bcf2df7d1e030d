"""The shared-memory EP transport (:mod:`hal.ep.shm`): selection, exchanges in rounds, cleanup.

The full Buffer semantics run on it in ``test_ep_multiprocess`` and ``test_ep_faults`` (both
parametrised over transports); here: what only this transport has.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import hal
from hal.ep import shm
from hal.ep.launch import run_local

HIDDEN = 1024  # 2 KiB bf16 rows: 600 of them overflow a 1 MiB slot, so exchanges take rounds


def both_transports(rank: int, world: int, tokens: int, slot_bytes: int = shm.MIN_SLOT) -> dict:
    """Dispatch, combine and low-latency round trips on shm and torch Buffers, with the same inputs."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    experts = 4 * world
    topk_idx = torch.rand(tokens, experts, generator=gen).topk(3, dim=1).indices
    weights = torch.rand(tokens, 3, generator=gen)
    out = {}
    for name in ("shm", "torch"):
        buffer = hal.ep.Buffer(transport=name, num_nvl_bytes=slot_bytes * world * world, explicitly_destroy=True)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
        layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        if name == "shm":
            out["combine_exchange"] = buffer.transport.comm.last_exchange
        ll_x, ll_count, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True)
        ll_out = buffer.low_latency_combine(ll_x[0].float().to(torch.bfloat16), topk_idx, weights, ll_handle)[0]
        out[name] = [recv_x, recv_idx, recv_w, torch.tensor(counts), combined, combined_w, ll_x[0].view(torch.uint8), ll_x[1], ll_count, ll_out]
        out[f"{name}_transport"] = buffer.transport.name
        if name == "shm":
            out["slot_bytes"] = buffer.transport.comm.region.slot_bytes
        buffer.destroy()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_exchanges_larger_than_a_slot_go_in_rounds_and_match_torch_distributed(world):
    outcomes = run_local(both_transports, world, 700, timeout_s=240)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        value = outcome.value
        assert (value["shm_transport"], value["torch_transport"]) == ("shm", "torch")
        assert 700 * 2 * HIDDEN > value["slot_bytes"], "the case must need more than one round"
        assert value["combine_exchange"].endswith("rounds") and value["combine_exchange"] != "1 rounds"
        for got, expected in zip(value["shm"], value["torch"]):
            assert torch.equal(got, expected), outcome.rank


@pytest.mark.parametrize("world", [2, 3])
def test_combine_reduces_in_place_when_the_receipt_fits_the_receive_area_and_matches_torch_distributed(world):
    """A receive area (a receiver's R adjacent slots) holds the whole combine: the senders write
    the rows where they belong there and the owner reduces them where they lie."""
    outcomes = run_local(both_transports, world, 700, 4 * shm.MIN_SLOT, timeout_s=240)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        value = outcome.value
        assert value["combine_exchange"] == "in place"
        for got, expected in zip(value["shm"], value["torch"]):
            assert torch.equal(got, expected), outcome.rank


def _selections(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hal.ep.transport import select_transport

    group = dist.group.WORLD
    options = {"num_nvl_bytes": 0, "num_rdma_bytes": 0, "low_latency_mode": False, "timeout_s": 10.0}

    def attempt(make) -> str:
        try:
            return make().name
        except Exception as exc:  # the test compares types and messages
            return f"{type(exc).__name__}: {exc}"

    out = {"auto": attempt(lambda: hal.ep.Buffer(group).transport), "torch": attempt(lambda: select_transport(group, torch.device("cpu"), options, "torch")),
           "ipc": attempt(lambda: hal.ep.Buffer(group, transport="ipc").transport),
           "shm on cuda": attempt(lambda: select_transport(group, torch.device("cuda"), options, "shm"))}
    os.environ["HAL_EP_TRANSPORT"] = "torch"
    out["env torch"] = attempt(lambda: hal.ep.Buffer(group).transport)
    os.environ["HAL_EP_TRANSPORT"] = "shm"
    out["env shm"] = attempt(lambda: hal.ep.Buffer(group).transport)
    os.environ["HAL_EP_SHM_BYTES"] = "lots"
    out["bad size"] = attempt(lambda: hal.ep.Buffer(group).transport)
    return out


def test_a_group_on_one_host_gets_shared_memory_unless_told_otherwise():
    outcome = run_local(_selections, 1, timeout_s=60)[0]
    assert outcome.returned, outcome.error
    got = outcome.value
    assert (got["auto"], got["torch"], got["env torch"], got["env shm"]) == ("shm", "torch", "torch", "shm")
    assert got["ipc"].startswith("OperatorNotSupportedError") and "'ipc'" in got["ipc"] and "not available" in got["ipc"]
    assert got["shm on cuda"].startswith("OperatorNotSupportedError") and "CPU tensors of gloo groups" in got["shm on cuda"]
    assert got["bad size"].startswith("EPError") and "HAL_EP_SHM_BYTES='lots'" in got["bad size"]
    assert not shm.leftover_segments()


def test_a_segment_left_by_a_crashed_creator_is_swept_at_the_next_creation(tmp_path):
    # A name whose creator's pid no longer exists, older than any creation in progress could be.
    dead = 2**22 + 12345
    while os.path.exists(f"/proc/{dead}"):
        dead += 1
    path = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{dead}-deadbeef0000")
    with open(path, "wb") as leftover:
        leftover.write(b"\0" * 64)
    old = time.time() - 10 * 60
    os.utime(path, (old, old))
    live = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{os.getpid()}-cafe00000000")  # its creator (this process) lives
    with open(live, "wb") as young:
        young.write(b"\0" * 64)
    os.utime(live, (old, old))
    try:
        outcomes = run_local(_one_buffer, 2, timeout_s=60)
        assert all(o.returned for o in outcomes), [(o.rank, o.error) for o in outcomes]
        assert not os.path.exists(path)
        assert os.path.exists(live), "a segment whose creator is alive is never swept"
    finally:
        for name in (path, live):
            if os.path.exists(name):
                os.unlink(name)


def _one_buffer(rank: int, world: int) -> str:
    return hal.ep.Buffer().transport.name


def _kill_during_use(rank: int, world: int) -> str:
    buffer = hal.ep.Buffer(timeout_s=5)
    if rank == 0:  # rank 0 unlinks the name before its setup returns; another rank may return first
        assert not shm.leftover_segments(), "the name is unlinked once every rank has mapped it"
    if rank == 1:
        os.kill(os.getpid(), 9)
    x = torch.ones(4, 128, dtype=torch.bfloat16)
    try:
        buffer.low_latency_dispatch(x, torch.zeros(4, 1, dtype=torch.int64), 4, 2 * world)
    except hal.ep.EPTimeoutError as exc:
        return str(exc)
    return "no error"


def test_a_killed_rank_is_reported_at_once_and_leaves_no_segment():
    start = time.monotonic()
    outcomes = run_local(_kill_during_use, 2, timeout_s=60)
    assert outcomes[1].exitcode == -9
    assert "exited" in outcomes[0].value and "rank 1" in outcomes[0].value, outcomes[0].value
    assert time.monotonic() - start < 30
    assert not shm.leftover_segments()


def test_hal_backends_says_which_transport_a_buffer_gets(monkeypatch):
    from hal.ep.transport import plan
    from hal.report import backends_report

    assert plan()["rule"]["cpu (gloo), ranks on one host"] == "shm"
    assert backends_report()["ep_transport"]["rule"]["cuda (nccl)"] == "torch"
    monkeypatch.setenv("HAL_EP_TRANSPORT", "torch")
    assert set(plan()["rule"].values()) == {"torch"} and plan()["forced"] == "torch"


def test_combine_keeps_its_own_rows_in_place_only_for_a_reduction_that_reads_segments():
    import hal
    from hal.ep.normal import _reduction_reads_segments
    from hal.ops.ep_local import EP_COMBINE_REDUCE, ROW_SEGMENTS

    cpu = torch.device("cpu")
    assert _reduction_reads_segments(cpu) == (ROW_SEGMENTS.name in hal.selection.select(EP_COMBINE_REDUCE, "cpu").backend.features(EP_COMBINE_REDUCE))
    older = [b for b in hal.registry.backends().values()
             if b.available and b.implements(EP_COMBINE_REDUCE.hook) and b.accepts_device("cpu") and ROW_SEGMENTS.name not in b.features(EP_COMBINE_REDUCE)]
    if not older:
        pytest.skip("no installed backend serves ep_combine_reduce at contract version 1")
    with hal.use_backend(older[0].name, op="ep_combine_reduce"):
        assert not _reduction_reads_segments(cpu)
