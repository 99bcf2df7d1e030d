"""The CUDA IPC EP transport (:mod:`hal.ep.ipc`): selection, its rules and errors, the handle
exchange, and the pluggable data plane it shares with the shm transport.

What needs no GPU runs everywhere: the decision every rank takes from every rank's facts, the
handle frames, the forced and automatic selection on real gloo ranks (CPU groups are refused,
a CUDA device without cupy is refused or falls back alike on every rank), ``plan()``, and the
exchanges through a data plane that is not the control region's own (exactly how ipc plugs its
GPU buffers in), against torch.distributed bit for bit. The data path on GPUs runs only where
CUDA and cupy are present: two processes on one GPU (a gloo group for the setup, the tokens on
the GPU) and two GPUs over NCCL, each compared bit for bit with the torch transport.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

import hal
from hal.ep import ipc, shm
from hal.ep.errors import EPError
from hal.ep.launch import run_local

CUPY = ipc.cupy_status() == ""
HIDDEN, TOPK = 1024, 3  # 2 KiB bf16 rows: a few hundred overflow a 1 MiB slot


# --- pure rules ---------------------------------------------------------------------------------


def test_importing_hal_and_its_ep_transports_imports_no_cupy():
    code = "import sys, hal, hal.ep, hal.ep.transport, hal.ep.ipc; hal.ep.transport.plan(); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "HAL_EP_TRANSPORT": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_each_rank_receive_area_is_num_nvl_bytes_in_whole_aligned_slots():
    assert ipc.area_bytes(0, 2) == ipc.DEFAULT_AREA_BYTES
    assert ipc.area_bytes(int(1e9), 8) == (int(1e9) // 8) // 64 * 64 * 8  # DeepEP's per-rank NVLink buffer size
    assert ipc.area_bytes(1000, 4) == 4 * shm.MIN_SLOT  # every slot holds at least one large row
    for world in (1, 3, 8):
        area = ipc.area_bytes(12345678, world)
        assert area % world == 0 and (area // world) % 64 == 0


def _facts(gpu: str = "0000:01:00.0", peers: dict | None = None, **changes) -> dict:
    facts = {"host": "node|boot|shm", "cupy": "", "slot_bytes": 1 << 20, "gpu": gpu, "peers": peers or {}, "error": ""}
    facts.update(changes)
    return facts


def test_the_decision_names_what_is_missing():
    a, b = "0000:01:00.0", "0000:02:00.0"
    two_gpus = [_facts(a, {b: True}), _facts(b, {a: True})]
    assert ipc.decide(two_gpus) is None
    assert ipc.decide([_facts(a), _facts(a)]) is None, "ranks on one GPU need no peer access"
    assert ipc.decide([_facts(a)]) is None
    cases = {
        "hosts": ([_facts(a, {b: True}), _facts(b, {a: True}, host="other|boot|shm")], ["not on one host", "node", "other"]),
        "no shm": ([_facts(a, host="node|boot|no /dev/shm"), _facts(a, host="node|boot|no /dev/shm")], ["/dev/shm"]),
        "no cupy": ([_facts(a), _facts(a, cupy="ModuleNotFoundError: No module named 'cupy'")],
                    ["cupy is not importable on rank 1", "No module named 'cupy'", "pip install unihal[ipc]", "cupy-cuda12x"]),
        "no cupy anywhere": ([_facts(cupy="ImportError: x"), _facts(cupy="ImportError: x")], ["ranks 0, 1"]),
        "no driver": ([_facts(a), _facts(gpu="", error="CUDARuntimeError: cudaErrorInsufficientDriver")], ["rank 1", "cudaErrorInsufficientDriver"]),
        "sizes": ([_facts(a), _facts(a, slot_bytes=2 << 20)], ["disagree", "num_nvl_bytes"]),
        "no peer access": ([_facts(a, {b: False}), _facts(b, {a: False})], ["no peer access", a, b, "rank 0", "rank 1"]),
        "one way": ([_facts(a, {b: True}), _facts(b, {a: False})], ["GPU 0000:02:00.0 (rank 1) has no peer access to GPU 0000:01:00.0 (rank 0)"]),
        "hidden": ([_facts(a, {}), _facts(b, {a: True})], ["does not see rank 1's GPU", "CUDA_VISIBLE_DEVICES"]),
    }
    for name, (facts, words) in cases.items():
        reason = ipc.decide(facts)
        assert reason is not None, name
        for word in words:
            assert word in reason, (name, reason)
    # Hosts come first: a group across machines is told so, whatever else is missing.
    assert "not on one host" in ipc.decide([_facts(cupy="ImportError: x"), _facts(host="b|c|shm")])


def test_handle_frames_come_back_by_rank_and_anything_else_is_refused():
    area = 4 << 20
    handles = [bytes([r]) * ipc.HANDLE_BYTES for r in range(3)]
    frames = [ipc.encode_handle(r, area, h) for r, h in enumerate(handles)]
    assert ipc.decode_handles(frames, area) == handles
    assert ipc.decode_handles([bytearray(f) for f in frames], area) == handles  # as gathered
    refusals = {
        "order": ([frames[1], frames[0], frames[2]], "frame 0 is not rank 0's"),
        "error": ([frames[0], ipc.encode_error(1, "CUDARuntimeError: cudaErrorMemoryAllocation"), frames[2]],
                  "rank 1 could not share its buffer: CUDARuntimeError: cudaErrorMemoryAllocation"),
        "short": ([frames[0], frames[1][:10], frames[2]], "rank 1 sent a 10-byte IPC frame"),
        "truncated handle": ([frames[0], frames[1], frames[2][:-1]], "rank 2 sent a 63-byte IPC handle"),
        "size": ([frames[0], ipc.encode_handle(1, 2 * area, handles[1]), frames[2]], "disagree on num_nvl_bytes"),
        "garbage": ([frames[0], b"x" * len(frames[1]), frames[2]], "frame 1 is not rank 1's"),
    }
    for name, (gathered, message) in refusals.items():
        with pytest.raises(EPError) as caught:
            ipc.decode_handles(gathered, area)
        assert message in str(caught.value), (name, str(caught.value))
    with pytest.raises(EPError, match="64 bytes"):
        ipc.encode_handle(0, area, b"short")


def test_waiting_for_the_gpu_honours_the_deadline():
    deadline = time.monotonic() + 0.2
    start = time.monotonic()
    assert not ipc.wait_for(lambda: False, lambda: deadline - time.monotonic())
    assert 0.2 <= time.monotonic() - start < 1.5
    ready = time.monotonic() + 0.05
    assert ipc.wait_for(lambda: time.monotonic() >= ready, lambda: 10.0)


def test_hal_backends_reports_the_rule_for_ipc(monkeypatch, tmp_path):
    from hal.ep.transport import plan

    monkeypatch.delenv("HAL_EP_TRANSPORT", raising=False)
    if not ipc.cupy_found():
        assert plan()["rule"]["cuda (nccl)"] == "torch"
        assert "cupy not found" in plan()["ipc"] and "pip install unihal[ipc]" in plan()["ipc"]
        # With cupy on the path (found, never imported by plan), one-host NCCL groups get ipc.
        (tmp_path / "cupy").mkdir()
        (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('plan() must not import cupy')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
    rule = plan()["rule"]["cuda (nccl)"]
    assert rule.startswith("ipc if the ranks share a host") and "peer access" in rule and rule.endswith("else torch"), rule
    assert plan()["ipc"].startswith("cupy found")
    assert plan()["rule"]["cpu (gloo), ranks on one host"] == "shm"
    monkeypatch.setenv("HAL_EP_TRANSPORT", "ipc")
    assert set(plan()["rule"].values()) == {"ipc"} and plan()["forced"] == "ipc"


# --- selection on real ranks --------------------------------------------------------------------


def _selections(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hal.ep.transport import select_transport

    group = dist.group.WORLD
    options = {"num_nvl_bytes": 0, "num_rdma_bytes": 0, "low_latency_mode": False, "timeout_s": 20.0}
    cuda = torch.device("cuda", 0)

    def attempt(make) -> str:
        try:
            return make().name
        except Exception as exc:  # the test compares types and messages
            return f"{type(exc).__name__}: {exc}"

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hal.ep").addHandler(handler)
    logging.getLogger("hal.ep").setLevel(logging.INFO)
    out = {
        "auto": attempt(lambda: hal.ep.Buffer(group).transport),
        "forced on cpu": attempt(lambda: hal.ep.Buffer(group, transport="ipc").transport),
        # The ipc rules on a CUDA device: the facts travel over this gloo group (no NCCL here).
        "forced on cuda": attempt(lambda: select_transport(group, cuda, options, "ipc")),
        "auto on cuda": attempt(lambda: select_transport(group, cuda, options, None)),
        "connect": ipc.connect(group, 20.0, ipc.area_bytes(0, world), cuda) if ipc.cupy_status() else "cupy present",
    }
    out["logged"] = list(logged)
    os.environ["HAL_EP_TRANSPORT"] = "ipc"
    out["env ipc"] = attempt(lambda: hal.ep.Buffer(group).transport)
    out["leftovers"] = shm.leftover_segments()
    return out


@pytest.mark.skipif(CUPY, reason="checks the refusals of a machine without cupy")
def test_ipc_is_refused_for_cpu_groups_and_without_cupy_alike_on_every_rank():
    outcomes = run_local(_selections, 2, timeout_s=90)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        got = outcome.value
        assert got["auto"] == "shm", "CPU ranks of one host keep shared memory"
        for key in ("forced on cpu", "env ipc"):
            assert got[key].startswith("OperatorNotSupportedError"), got[key]
            assert "'ipc'" in got[key] and "ipc carries CUDA tensors; CPU groups use shm" in got[key] and "gloo on cpu" in got[key]
        forced = got["forced on cuda"]
        assert forced.startswith("BackendUnavailableError: EP transport 'ipc': cupy is not importable on ranks 0, 1"), forced
        assert "pip install unihal[ipc]" in forced and "cupy-cuda12x" in forced
        assert got["auto on cuda"] == "torch"
        assert any("CUDA IPC transport not used" in line and "cupy is not importable" in line for line in got["logged"]), got["logged"]
        assert got["connect"].startswith("cupy is not importable on ranks 0, 1")
        assert not got["leftovers"]
    assert outcomes[0].value["forced on cuda"] == outcomes[1].value["forced on cuda"]


# --- the pluggable data plane, on CPU ranks -----------------------------------------------------


def _dyadic_inputs(rank: int, world: int, tokens: int, device: torch.device) -> dict:
    """Tokens k/8 (|k| <= 64) and weights in {1/4, 1/2, 1, 2}: every weighted sum is exact in fp32,
    so results compare bit for bit across devices and reduction orders."""
    gen = torch.Generator().manual_seed(1000 * world + rank)
    experts = 4 * world
    x = (torch.randint(-64, 65, (tokens, HIDDEN), generator=gen).float() / 8).to(torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, generator=gen).topk(TOPK, dim=1).indices
    topk_idx[torch.rand(tokens, TOPK, generator=gen) < 0.2] = -1
    weights = torch.tensor([0.25, 0.5, 1.0, 2.0])[torch.randint(0, 4, (tokens, TOPK), generator=gen)]
    return {"x": x.to(device), "topk_idx": topk_idx.to(device), "weights": weights.to(device), "experts": experts}


def _script(transport, rank: int, world: int, tokens: int, device: torch.device) -> list[torch.Tensor]:
    """Layout, dispatch, combine, cached dispatch and a low-latency round trip, through a
    transport's own methods (what a Buffer calls); results on the CPU."""
    inp = _dyadic_inputs(rank, world, tokens, device)
    x, topk_idx, weights, experts = inp["x"], inp["topk_idx"], inp["weights"], inp["experts"]
    per_rank, _, per_expert, in_rank, _ = transport.get_dispatch_layout(topk_idx, experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = transport.dispatch(
        x, handle=None, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=None, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights, expert_alignment=1, num_worst_tokens=0, async_finish=False,
    )
    combined, combined_w, _ = transport.combine((recv_x.float() * (rank + 1)).to(torch.bfloat16), handle, topk_weights=recv_w, async_finish=False)
    cached = transport.dispatch(x, handle=handle, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                                num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1, num_worst_tokens=0, async_finish=False)[0]
    ll_x, ll_count, ll_handle, _, _ = transport.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank=tokens, num_experts=experts, cumulative_local_expert_recv_stats=None,
        use_fp8=False, async_finish=False, return_recv_hook=False,
    )
    ll_out = transport.low_latency_combine((ll_x.float() / 2).to(torch.bfloat16), topk_idx, weights, ll_handle,
                                           async_finish=False, return_recv_hook=False, out=None)[0]
    results = [per_rank, per_expert, in_rank, recv_x, recv_idx, recv_w, torch.tensor(counts), combined, combined_w, cached, ll_x, ll_count, ll_out]
    return [r.cpu() for r in results]


class _Settling(shm.ShmCommunicator):
    """A shm communicator that records when the data plane would be settled: the epoch this rank
    is about to leave (ipc synchronises its GPU work there)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settled: list[int] = []

    def _settle(self, phase: str) -> None:
        self.settled.append(self._epoch)


def _separate_data_plane(rank: int, world: int, tokens: int) -> dict:
    """ipc's structure on CPU ranks: a control region without data slots, and the slots elsewhere
    (here a second region); the same script as the torch transport, bit for bit."""
    import torch.distributed as dist

    from hal.ep.comm import Communicator
    from hal.ep.transport import ShmTransport

    group = dist.group.WORLD
    cpu = torch.device("cpu")
    setup = Communicator(group, 30.0)
    setup.begin("test setup")
    # Every region first (collective, within the setup's deadline): a control region without
    # data slots and a data plane of its own for each case.
    controls = {"rounds": shm.open_region(setup, 0), "in place": shm.open_region(setup, 0)}
    planes = {"rounds": shm.open_region(setup, shm.MIN_SLOT * world * world), "in place": shm.open_region(setup, 8 * shm.MIN_SLOT * world * world)}
    out: dict = {"control data bytes": controls["rounds"].data.numel(), "control slot bytes": controls["rounds"].slot_bytes}
    reference = hal.ep.Buffer(group, transport="torch", explicitly_destroy=True)
    out["torch"] = _script(reference.transport, rank, world, tokens, cpu)
    reference.destroy()
    for name, plane in planes.items():
        comm = _Settling(group, 30.0, controls[name], slots=plane.slots)
        assert comm.slots is plane.slots and comm.region.slot_bytes == 0
        out[name] = _script(ShmTransport(comm), rank, world, tokens, cpu)
        out[f"{name} exchange"] = comm.last_exchange
        out[f"{name} settled"] = comm.settled
        out[f"{name} epochs"] = comm._epoch
        out[f"{name} used"] = bool(plane.data.any())
        comm.close()
        plane.close()
    out["leftovers"] = shm.leftover_segments()
    return out


def test_exchanges_run_through_a_data_plane_other_than_the_control_regions():
    outcomes = run_local(_separate_data_plane, 2, 600, timeout_s=120)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        got = outcome.value
        assert got["control data bytes"] == 0 and got["control slot bytes"] == 0
        assert got["rounds exchange"].endswith("rounds") and got["rounds exchange"] != "1 rounds", got["rounds exchange"]
        assert got["in place exchange"] == "in place"
        for name in ("rounds", "in place"):
            assert got[f"{name} used"], "the tokens went through the plugged-in slots"
            # The data plane settles before every barrier this rank signals, and only then.
            assert got[f"{name} settled"] == list(range(got[f"{name} epochs"])), (name, got[f"{name} settled"])
            for index, (mine, expected) in enumerate(zip(got[name], got["torch"], strict=True)):
                assert torch.equal(mine, expected), (outcome.rank, name, index)
        assert not got["leftovers"]


# --- on GPUs (skipped without CUDA and cupy) -----------------------------------------------------


def _ipc_on_one_gpu(rank: int, world: int, tokens: int) -> dict:
    """Two processes on GPU 0: a gloo group sets up the IPC buffers (NCCL refuses two ranks on one
    GPU), the tokens move on the GPU; the torch transport on CPU copies is the reference."""
    import torch.distributed as dist

    from hal.ep.transport import IpcTransport

    torch.cuda.set_device(0)
    group, gpu = dist.group.WORLD, torch.device("cuda", 0)
    reference = hal.ep.Buffer(group, transport="torch", explicitly_destroy=True)
    out: dict = {"torch": _script(reference.transport, rank, world, tokens, torch.device("cpu"))}
    reference.destroy()
    for name, nbytes in (("rounds", shm.MIN_SLOT * world), ("in place", 16 * shm.MIN_SLOT * world)):
        comm = ipc.connect(group, 60.0, ipc.area_bytes(nbytes, world), gpu)
        assert not isinstance(comm, str), comm
        transport = IpcTransport(comm)
        out[name] = _script(transport, rank, world, tokens, gpu)
        out[f"{name} exchange"] = comm.last_exchange
        out[f"{name} device"] = str(comm.slots.areas[1 - rank].device)
        transport.close()
    out["leftovers"] = shm.leftover_segments()
    return out


@pytest.mark.skipif(not torch.cuda.is_available() or not CUPY, reason="needs a CUDA GPU and cupy")
def test_two_processes_on_one_gpu_exchange_through_cuda_ipc_bit_for_bit():
    outcomes = run_local(_ipc_on_one_gpu, 2, 600, timeout_s=300, env={"HAL_BACKEND": "reference"})
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for outcome in outcomes:
        got = outcome.value
        assert got["rounds exchange"].endswith("rounds") and got["in place exchange"] == "in place"
        assert got["rounds device"] == "cuda:0"
        for name in ("rounds", "in place"):
            for index, (mine, expected) in enumerate(zip(got[name], got["torch"], strict=True)):
                assert torch.equal(mine, expected), (outcome.rank, name, index)
        assert not got["leftovers"]


def _ipc_on_gpus(rank: int, world: int, tokens: int) -> dict:
    """NCCL ranks on their own GPUs: a Buffer selects ipc by itself; torch.distributed is the reference."""
    gpu = torch.device("cuda", rank)
    out: dict = {}
    reference = hal.ep.Buffer(transport="torch", explicitly_destroy=True)
    out["torch"] = _script(reference.transport, rank, world, tokens, gpu)
    reference.destroy()
    for name, nbytes in (("rounds", shm.MIN_SLOT * world), ("in place", 16 * shm.MIN_SLOT * world)):
        buffer = hal.ep.Buffer(num_nvl_bytes=nbytes, explicitly_destroy=True)  # automatic: ipc on one host
        out[f"{name} transport"] = buffer.transport.name
        out[name] = _script(buffer.transport, rank, world, tokens, gpu)
        out[f"{name} exchange"] = buffer.transport.comm.last_exchange
        buffer.destroy()
    out["leftovers"] = shm.leftover_segments()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not CUPY or not torch.cuda.can_device_access_peer(0, 1),
                    reason="needs two CUDA GPUs with peer access, and cupy")
def test_ipc_is_selected_for_nccl_ranks_of_one_host_and_matches_torch_bit_for_bit():
    outcomes = run_local(_ipc_on_gpus, 2, 600, timeout_s=300.0, env={"HAL_BACKEND": "reference"}, backend="nccl")
    assert all(o.value is not None or o.error for o in outcomes), outcomes  # every rank reported
    for rank, got, error in ((o.rank, o.value, o.error) for o in outcomes):
        assert not error, (rank, error)
        assert got["rounds transport"] == got["in place transport"] == "ipc"
        assert got["rounds exchange"].endswith("rounds") and got["in place exchange"] == "in place"
        for name in ("rounds", "in place"):
            for index, (mine, expected) in enumerate(zip(got[name], got["torch"], strict=True)):
                assert torch.equal(mine, expected), (rank, name, index)
        assert not got["leftovers"]
