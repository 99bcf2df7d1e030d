"""``hal.ep.Buffer`` in this process (a one-rank gloo group): its argument checks, timeout
settings, events and hooks, and the choice of transport through the ``hal_ep_transport`` hook."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hal
from hal.ep.errors import EPError
from hal.ep.event import EventOverlap

HIDDEN, EXPERTS = 256, 4


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('ep') / 'rendezvous'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def routed(group):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen)
    buffer = hal.ep.Buffer(group)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    return buffer, x, topk_idx, weights, layout


def test_buffer_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(EPError, match="init_process_group"):
        hal.ep.Buffer()


def test_timeout_comes_from_the_argument_the_environment_or_deepeps_default(group, monkeypatch):
    assert hal.ep.Buffer(group).timeout_s == 100.0
    monkeypatch.setenv("HAL_EP_TIMEOUT_S", "2.5")
    buffer = hal.ep.Buffer(group)
    assert buffer.timeout_s == 2.5 and "timeout 2.5 s" in repr(buffer) and "'shm'" in repr(buffer)  # a gloo group on one host
    assert hal.ep.Buffer(group, timeout_s=7).timeout_s == 7.0
    monkeypatch.setenv("HAL_EP_TIMEOUT_S", "soon")
    with pytest.raises(EPError, match="HAL_EP_TIMEOUT_S='soon'"):
        hal.ep.Buffer(group)
    with pytest.raises(EPError, match="positive"):
        hal.ep.Buffer(group, timeout_s=0)


def test_events_and_hooks_of_a_synchronous_transport(routed):
    buffer, x, topk_idx, weights, layout = routed
    *_, handle, event = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, previous_event=buffer.capture(), **layout)
    assert isinstance(event, EventOverlap) and event.event is None  # CPU: nothing to wait for
    event.current_stream_wait()
    with event:
        pass
    *_, hook = buffer.low_latency_dispatch(x, topk_idx, 8, EXPERTS, return_recv_hook=True)
    assert hook() is None


def _handle_of_other_buffer(group, x, layout):
    return hal.ep.Buffer(group).dispatch(x, **layout)[4]


BAD_CALLS = {
    "complex tokens": (lambda b, x, t, w, lay: b.dispatch(x.to(torch.complex64), topk_idx=t, topk_weights=w, **lay), hal.DTypeError, "x"),
    "2-byte tokens with scales": (lambda b, x, t, w, lay: b.dispatch((x, torch.ones(5, 2)), **lay), hal.DTypeError, "x\\[0\\]"),
    "fp8 with no scale per token": (lambda b, x, t, w, lay: b.dispatch((x[:, :100].float().to(hal.checks.FP8), torch.ones(5, 0)), **lay), hal.ShapeError, "scales per token"),
    "fp8 scales for other tokens": (lambda b, x, t, w, lay: b.dispatch((x.float().to(hal.checks.FP8), torch.ones(4, 3)), **lay), hal.ShapeError, "x\\[1\\]"),
    "float64 scales": (lambda b, x, t, w, lay: b.dispatch((x.float().to(hal.checks.FP8), torch.ones(5, 3, dtype=torch.float64)), **lay), hal.DTypeError, "x\\[1\\]"),
    "topk_idx without weights": (lambda b, x, t, w, lay: b.dispatch(x, topk_idx=t, **lay), hal.DTypeError, "both given or both None"),
    "counts that disagree with the map": (lambda b, x, t, w, lay: b.dispatch(x, **{**lay, "num_tokens_per_rank": lay["num_tokens_per_rank"] + 1}), hal.ValueRangeError, "is_token_in_rank.sum"),
    "a token kept from its expert's rank": (
        lambda b, x, t, w, lay: b.dispatch(x, topk_idx=t, topk_weights=w, num_tokens_per_rank=lay["num_tokens_per_rank"] - 1,
                                           is_token_in_rank=torch.cat([torch.zeros(1, 1, dtype=torch.bool), lay["is_token_in_rank"][1:]]),
                                           num_tokens_per_expert=lay["num_tokens_per_expert"]),
        hal.ValueRangeError, "would be dropped"),
    "rdma counts of another layout": (lambda b, x, t, w, lay: b.dispatch(x, num_tokens_per_rdma_rank=torch.tensor([2], dtype=torch.int32), **lay), hal.ValueRangeError, "num_tokens_per_rdma_rank"),
    "too few worst-case tokens": (lambda b, x, t, w, lay: b.dispatch(x, num_worst_tokens=2, **lay), hal.ValueRangeError, "num_worst_tokens"),
    "zero expert alignment": (lambda b, x, t, w, lay: b.dispatch(x, expert_alignment=0, **lay), hal.ValueRangeError, "expert_alignment"),
    "top-k in a cached dispatch": (lambda b, x, t, w, lay: b.dispatch(x, handle=b.dispatch(x, **lay)[4], topk_idx=t, topk_weights=w), hal.DTypeError, "None with a handle"),
    "a low-latency handle to combine": (lambda b, x, t, w, lay: b.combine(x, b.low_latency_dispatch(x, t, 8, EXPERTS)[2]), hal.DTypeError, "DispatchHandle"),
    "a handle of another Buffer": (lambda b, x, t, w, lay: b.combine(x, _handle_of_other_buffer(b.group, x, lay)), hal.ValueRangeError, "another Buffer"),
    "low-latency fp32 tokens": (lambda b, x, t, w, lay: b.low_latency_dispatch(x.float(), t, 8, EXPERTS), hal.DTypeError, "bfloat16"),
    "low-latency fp8 without 128 channels": (lambda b, x, t, w, lay: b.low_latency_dispatch(x[:, :64], t, 8, EXPERTS), hal.ShapeError, "use_fp8"),
    "low-latency stats of the wrong shape": (
        lambda b, x, t, w, lay: b.low_latency_dispatch(x, t, 8, EXPERTS, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)),
        hal.ShapeError, "cumulative_local_expert_recv_stats"),
    "low-latency combine of the wrong shape": (lambda b, x, t, w, lay: b.low_latency_combine(x, t, w, b.low_latency_dispatch(x, t, 8, EXPERTS)[2]), hal.ShapeError, "num_local_experts"),
    "low-latency output of the wrong dtype": (
        lambda b, x, t, w, lay: b.low_latency_combine(torch.zeros(EXPERTS, 8, HIDDEN, dtype=torch.bfloat16), t, w, _ll_handle(b, x, t), out=torch.empty(5, HIDDEN)),
        hal.DTypeError, "out"),
}


def _ll_handle(buffer, x, topk_idx):
    return buffer.low_latency_dispatch(x, topk_idx, 8, EXPERTS, use_fp8=False)[2]


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_typed_errors_and_leave_the_buffer_usable(routed, case):
    buffer, x, topk_idx, weights, layout = routed
    call, error, match = BAD_CALLS[case]
    with pytest.raises(error, match=match):
        call(buffer, x, topk_idx, weights, layout)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    assert torch.equal(buffer.combine(recv_x, handle)[0], x)


def test_a_backend_can_supply_the_transport(group, install_plugins, monkeypatch):
    install_plugins({"eptransport": "ep_transport_backend"})
    import ep_transport_backend  # noqa: PLC0415  (on sys.path once installed)

    ep_transport_backend.CALLS.clear()
    assert hal.get_backend("eptransport").implements("hal_ep_transport")
    buffer = hal.ep.Buffer(group)
    assert buffer.transport.name == "recording"
    x = torch.randn(3, HIDDEN).to(torch.bfloat16)
    in_rank = torch.ones(3, 1, dtype=torch.bool)
    recv_x, *_, handle, _ = buffer.dispatch(x, num_tokens_per_rank=torch.tensor([3], dtype=torch.int32), is_token_in_rank=in_rank,
                                            num_tokens_per_expert=torch.zeros(EXPERTS, dtype=torch.int32))
    assert torch.equal(buffer.combine(recv_x, handle)[0], x) and ep_transport_backend.CALLS == ["dispatch", "combine"]
    assert hal.ep.Buffer(group, low_latency_mode=True).transport.name == "shm", "a backend that declines is passed over"
    assert hal.ep.Buffer(group, transport="torch").transport.name == "torch"
    monkeypatch.setenv("HAL_EP_TRANSPORT", "torch")
    assert hal.ep.Buffer(group).transport.name == "torch"
    with pytest.raises(hal.OperatorNotSupportedError, match="supplies no transport"):
        hal.ep.Buffer(group, transport="eptransport", low_latency_mode=True)
    with pytest.raises(hal.OperatorNotSupportedError, match="supplies no transport"):
        hal.ep.Buffer(group, transport="reference")
    with pytest.raises(hal.UnknownBackendError, match="no such backend"):
        hal.ep.Buffer(group, transport="nonexistent")


def test_event_overlap_takes_deep_eps_hook_and_release_forms():
    from hal.ep import EventOverlap

    ran = []
    event = EventOverlap()
    event.register_hook_after_wait(lambda: ran.append("hook"))
    with pytest.raises(RuntimeError, match="already registered"):
        event.register_hook_after_wait(lambda: None)
    with event(release_handle=True):
        ran.append("body")
    assert ran == ["body", "hook"] and event.event is None and event.hook_after_wait is None
    event.current_stream_wait(release_handle=True)  # no hook left, nothing to wait for
    assert ran == ["body", "hook"]
