"""DeepEP's current legacy ``Buffer`` surface through hal.compat.deep_ep on 2 and 4 gloo ranks, shaped
like its tests/legacy/test_intranode.py and test_low_latency.py: every constructor argument, the
config and lifetime methods, ``config=`` / ``allocate_on_comm_stream`` / ``bias``, and the
low-latency options ``round_scale``, ``use_ue8m0``, ``use_logfmt``, ``zero_copy``, ``out``."""

from __future__ import annotations

import pytest
import torch

from hal.compat import deep_ep
from hal.ep.launch import run_local
from hal.errors import ArgumentError, ValueRangeError
from hal.ops.logfmt import logfmt_bound
from hal.ops.ue8m0 import per_token_cast_to_fp8, unpack_ue8m0_from_int

HIDDEN, EXPERTS_PER_RANK, TOPK, MAX_TOKENS = 512, 2, 2, 8


def inputs(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7 * world + rank)
    tokens = 5 + rank
    num_experts = EXPERTS_PER_RANK * world
    topk_idx = torch.stack([torch.randperm(num_experts, generator=g)[:TOPK] for _ in range(tokens)])
    topk_idx[0, 1] = -1
    x = (torch.randn(tokens, HIDDEN, generator=g) * 0.25).to(torch.bfloat16)
    return {"x": x, "topk_idx": topk_idx, "weights": torch.rand(tokens, TOPK, generator=g),
            "bias": (torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16), torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16))}


def script(rank: int, world: int) -> dict:
    buffer = deep_ep.Buffer(None, 1024, 0, False, 4, False, False, True, False, timeout_s=60)  # DeepEP's positional order
    inp = inputs(rank, world)
    x, topk_idx, weights, num_experts = inp["x"], inp["topk_idx"], inp["weights"], EXPERTS_PER_RANK * world
    out: dict = {}
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(topk_idx, num_experts, buffer.capture(), True, True)
    config = deep_ep.Buffer.get_dispatch_config(world)
    recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
        x, None, per_rank, per_rdma, in_rank, per_expert, topk_idx, weights, 1, 0, config, event, True, True
    )
    # FP8 tokens with packed int32 UE8M0 scales, which DeepEP's dispatch also takes and hands over as they came
    codes, packed = per_token_cast_to_fp8(x, use_ue8m0=True, use_packed_ue8m0=True)
    (recv_codes, recv_packed), *_ , fp8_handle, _ = buffer.dispatch(
        (codes, packed), None, per_rank, per_rdma, in_rank, per_expert, topk_idx, weights)
    out["packed_dispatch"] = [recv_codes, recv_packed, fp8_handle.recv_src_idx, fp8_handle.rank_prefix_matrix]
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head = handle  # DeepEP's six
    out["handle"] = [rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head, in_rank]
    combined, _, _ = buffer.combine(recv_x, handle, None, inp["bias"], deep_ep.Buffer.get_combine_config(world), None, True, True)
    plain, _, _ = buffer.combine(recv_x, handle)
    out["bias"] = [combined, plain]
    # Low latency: rounded scales, packed scales, LogFMT and zero-copy combine
    for round_scale, use_ue8m0 in ((True, False), (True, True)):
        recv, count, ll_handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, MAX_TOKENS, num_experts, None, None, True, round_scale, use_ue8m0, False, True
        )
        hook()
        out[f"ll_scales_{int(use_ue8m0)}"] = [recv[0], recv[1], count, ll_handle[0]]
    recv, count, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    y = buffer.get_next_low_latency_combine_buffer(ll_handle)
    y.copy_((recv.float() * 0.5).to(torch.bfloat16))
    result = torch.empty(x.shape[0], HIDDEN, dtype=torch.bfloat16)
    exact, _, _ = buffer.low_latency_combine(y, topk_idx, weights, ll_handle, False, True, False, False, result)
    compressed, _, _ = buffer.low_latency_combine(y, topk_idx, weights, ll_handle, use_logfmt=True)
    out["logfmt"] = [exact, compressed, result.data_ptr() == exact.data_ptr(), y.clone()]
    # zero_copy as DeepEP's test uses it: the outputs were written into the buffer; x gives the shape
    zero_copied, _, hook = buffer.low_latency_combine(torch.zeros_like(y), topk_idx, weights, ll_handle, zero_copy=True)
    out["zero_copy"] = [zero_copied, hook is None]
    out["zero_copy_wrong_shape"] = type(_error(lambda: buffer.low_latency_combine(y[:, 1:], topk_idx, weights, ll_handle, zero_copy=True))).__name__
    out["no_hook"] = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)[4] is None
    src_info, layout_range, max_tokens, hidden, experts = ll_handle  # DeepEP's five fields
    out["ll_handle_fields"] = [max_tokens, hidden, experts]
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)
    out["local_buffer"] = list(buffer.get_local_buffer_tensor(torch.float32, torch.Size([4, 2])).shape)
    buffer.destroy()
    out["after_destroy"] = str(_error(lambda: buffer.get_dispatch_layout(topk_idx, num_experts)))
    return out


def test_low_latency_fp8_cast_is_deepeps_bit_for_bit():
    """DeepEP's calculate_fp8_scales: scale_inv = amax * fp32(1 / 448) (a multiply, not DeepGEMM's
    division), codes x * (448 / amax); round_scale: 2^ceil(log2(amax * fp32(1 / 448))), codes x * 2^-e."""
    import numpy as np

    from hal.ep.low_latency import cast_fp8

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(48, 512, generator=g) * torch.rand(48, 1, generator=g) * 4).to(torch.bfloat16)
    x[0, :128] = 0.0  # amax floored at 1e-4
    x[1, :128] = 3e-5
    x[2, 5] = 448.0  # amax 448 * 2^k: the rounded scale sits on a power of two
    x[3, 200] = -896.0
    x[4, 7] = float("nan")  # DeepEP's fmaxf skips it: the group keeps a finite scale, only this code is NaN
    x[5, 300] = float("inf")
    values = x.float().view(48, 4, 128).numpy()
    amax = np.maximum(np.fmax.reduce(np.abs(values), axis=2), np.float32(1e-4)).astype(np.float32)
    inv = np.float32(1.0) / np.float32(448.0)
    want = (amax * inv).astype(np.float32)
    codes, scales = cast_fp8(x, round_scale=False)
    assert np.array_equal(scales.numpy().view(np.int32), want.view(np.int32))
    assert np.isfinite(scales[4].numpy()).all() and torch.isnan(codes[4].float()).sum() == 1
    assert not np.array_equal(want.view(np.int32), (amax / np.float32(448.0)).astype(np.float32).view(np.int32)), "the division differs somewhere"
    with np.errstate(invalid="ignore"):  # inf * 0 in the inf row: NaN, as the kernel's product
        want_codes = torch.from_numpy((values * (np.float32(448.0) / amax)[:, :, None]).astype(np.float32)).to(torch.float8_e4m3fn).view(48, 512)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    codes, scales = cast_fp8(x, round_scale=True)
    finite = np.isfinite(want).all(axis=1)  # an inf amax is outside fast_pow2's range (DeepEP's own -126..127 contract)
    mantissa, exponent = np.frexp(want[finite].astype(np.float64))  # want = mantissa * 2^exponent, mantissa in [0.5, 1)
    e = np.where(mantissa == 0.5, exponent - 1, exponent)
    assert np.array_equal(scales.numpy()[finite], np.ldexp(np.float32(1.0), e).astype(np.float32))
    rounded = torch.from_numpy((values[finite] * np.ldexp(np.float32(1.0), -e)[:, :, None]).astype(np.float32)).to(torch.float8_e4m3fn)
    assert torch.equal(codes[torch.from_numpy(finite)].view(torch.uint8), rounded.view(-1, 512).view(torch.uint8))


def any_token_form(rank: int, world: int) -> dict:
    """DeepEP's dispatch moves bytes: 1-byte tokens with any number of float32/int32 scales per token
    (any strides), and tokens of any dtype without scales; a cached dispatch moves them alike."""
    buffer = deep_ep.Buffer(None, 1 << 20, 0)
    g = torch.Generator().manual_seed(rank)
    tokens, hidden, num_experts = 6 + rank, 256, 4 * world
    topk_idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(tokens)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    x = torch.randn(tokens, hidden, generator=g)
    codes = (x * 8).to(torch.float8_e4m3fn)
    forms = {
        "one scale per token": (codes, torch.rand(tokens, 1, generator=g)),
        "a scale per 32 channels": (codes, torch.rand(tokens, hidden // 32, generator=g)),
        "uint8 codes": (codes.view(torch.uint8), torch.rand(tokens, hidden // 128, generator=g)),
        "e5m2 codes": ((x * 4).to(torch.float8_e5m2), torch.rand(tokens, hidden // 128, generator=g)),
        "column-major scales": (codes, torch.rand(hidden // 128, tokens, generator=g).T),
        "int32 scales": (codes, torch.randint(0, 1 << 30, (tokens, 1), generator=g, dtype=torch.int32)),
        "fp8 without scales": codes,
        "int32 tokens": torch.randint(0, 1 << 30, (tokens, 8), generator=g, dtype=torch.int32),
    }
    out = {"inputs": forms}
    for name, tokens_in in forms.items():
        recv, _, _, _, handle, _ = buffer.dispatch(tokens_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        cached, *_ = buffer.dispatch(tokens_in, handle=handle)
        out[name] = (recv, cached, handle.recv_src_idx, handle.rank_prefix_matrix)
    return out


def test_dispatch_moves_any_token_form_as_deepep():
    outcomes = run_local(any_token_form, 2, timeout_s=150)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    results = [o.value for o in outcomes]
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    for me, out in enumerate(results):
        for name in out["inputs"]:
            recv, cached, src, prefix = out[name]
            parts = recv if isinstance(recv, tuple) else (recv,)
            again = cached if isinstance(cached, tuple) else (cached,)
            assert all(torch.equal(as_bytes(a), as_bytes(b)) for a, b in zip(parts, again)), name
            start = 0
            for sender in range(2):
                end = int(prefix[sender, me])
                sent = results[sender]["inputs"][name]
                sent = sent if isinstance(sent, tuple) else (sent,)
                index = src[start:end].long()
                assert all(torch.equal(as_bytes(p[start:end]), as_bytes(s[index])) for p, s in zip(parts, sent)), name
                assert all(p.dtype == s.dtype for p, s in zip(parts, sent)), name
                start = end
            assert start == parts[0].shape[0]


def mismatched_scales(rank: int, world: int) -> str:
    """Rank 0 sends one scale per token, rank 1 two: every rank refuses, naming the scale forms."""
    buffer = deep_ep.Buffer(None, 1 << 20, 0)
    topk_idx = torch.tensor([[0, 1], [2, 3]])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    codes = torch.ones(2, 128).to(torch.float8_e4m3fn)
    error = _error(lambda: buffer.dispatch((codes, torch.ones(2, 1 + rank)), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                           num_tokens_per_expert=per_expert))
    return f"{type(error).__name__}: {error}"


def test_ranks_must_agree_on_the_scales_form():
    outcomes = run_local(mismatched_scales, 2, timeout_s=150)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    for o in outcomes:
        assert o.value.startswith("DTypeError") and "1 per token" in o.value and "2 per token" in o.value, o.value


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request):
    outcomes = run_local(script, request.param, timeout_s=150)
    assert all(o.returned for o in outcomes), [(o.rank, o.exitcode, o.error) for o in outcomes]
    return request.param, [o.value for o in outcomes]


def test_bias_is_added_in_float32_before_the_rounding(world):
    size, results = world
    for rank, out in enumerate(results):
        combined, plain = out["bias"]
        b0, b1 = inputs(rank, size)["bias"]
        want = (plain.float() + b0.float() + b1.float()).bfloat16()
        assert (combined.float() - want.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.float().abs().max()


def test_rounded_and_packed_scales(world):
    size, results = world
    for rank, out in enumerate(results):
        codes, scales, count, _ = out["ll_scales_0"]
        assert ((scales.view(torch.int32) & 0x7FFFFF) == 0).all(), "round_scale gives powers of two"
        packed_codes, packed, packed_count, _ = out["ll_scales_1"]
        assert packed.dtype == torch.int32 and packed.shape == (EXPERTS_PER_RANK, size * MAX_TOKENS, HIDDEN // 512)
        assert packed.stride(1) == 1, "column-major in the last two dimensions, as DeepEP returns them"
        assert torch.equal(packed_codes, codes) and torch.equal(count, packed_count)
        for e in range(EXPERTS_PER_RANK):
            n = int(count[e])
            assert torch.equal(unpack_ue8m0_from_int(packed[e, :n].contiguous()), scales[e, :n])
        # Every received token is one of the senders' tokens cast with rounded scales.
        senders = [per_token_cast_to_fp8(inputs(r, size)["x"], use_ue8m0=True) for r in range(size)]
        for e in range(EXPERTS_PER_RANK):
            for slot in range(int(count[e])):
                src = int(out["ll_scales_0"][3][e, slot])
                assert any(src < s[0].shape[0] and torch.equal(s[0][src].view(torch.uint8), codes[e, slot].view(torch.uint8)) for s in senders)


def test_logfmt_combine_within_its_bound_and_zero_copy(world):
    size, results = world
    for rank, out in enumerate(results):
        exact, compressed, wrote_out, y = out["logfmt"]
        assert wrote_out and out["zero_copy_wrong_shape"] == "ShapeError" and out["no_hook"]
        assert out["ll_handle_fields"][0] == MAX_TOKENS and out["ll_handle_fields"][1] == HIDDEN
        zero_copied, no_hook = out["zero_copy"]
        assert torch.equal(zero_copied, exact) and no_hook
        weights = inputs(rank, size)["weights"]
        # Each token sums at most TOPK expert rows, each within the LogFMT bound of its values (|y| <= max |y|).
        bound = logfmt_bound(y.view(-1, HIDDEN)).max() * weights.abs().sum(dim=1, keepdim=True) + 1e-2 * exact.float().abs()
        assert ((compressed.float() - exact.float()).abs() <= bound).all()
        assert not torch.equal(compressed, exact), "LogFMT is lossy: the payload really went through it"


def test_dispatch_handle_is_deepep_six_fields(world):
    """The handle unpacks as DeepEP's (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
    recv_src_idx, is_token_in_rank, send_head), with the channel fields of one channel."""
    size, results = world
    for rank, out in enumerate(results):
        prefix, channel, recv_channel, recv_src, in_rank, send_head, layout_in_rank = out["handle"]
        assert torch.equal(in_rank, layout_in_rank)
        sent = layout_in_rank.to(torch.int32)
        assert channel.dtype == torch.int32 and torch.equal(channel, sent.sum(dim=0, dtype=torch.int32).view(size, 1))
        assert recv_channel.dtype == torch.int32 and torch.equal(recv_channel, torch.zeros(size, 1, dtype=torch.int32))
        assert send_head.dtype == torch.int32 and send_head.shape == layout_in_rank.shape
        for r in range(size):  # token t's place in the queue to rank r: 0, 1, 2, ... over the tokens sent there, -1 elsewhere
            chosen = layout_in_rank[:, r]
            assert torch.equal(send_head[chosen, r], torch.arange(int(chosen.sum()), dtype=torch.int32))
            assert (send_head[~chosen, r] == -1).all()
        # rank_prefix_matrix and recv_src_idx: the rows from rank i are its tokens sent here, in order
        senders = [inputs(i, size)["x"].shape[0] for i in range(size)]
        assert prefix.shape == (size, size) and recv_src.dtype == torch.int32
        start = 0
        for i in range(size):
            end = int(prefix[i, rank])
            assert (recv_src[start:end] < senders[i]).all() and torch.equal(recv_src[start:end], recv_src[start:end].sort().values)
            start = end
        assert start == recv_src.shape[0]


def test_lifetime_and_local_buffer(world):
    _, results = world
    for out in results:
        assert out["local_buffer"] == [4, 2]
        assert "destroyed" in out["after_destroy"]


def test_config_and_size_hints():
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_496  # DeepEP's layout arithmetic
    config = deep_ep.Buffer.get_dispatch_config(8)
    assert (config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens) == (6, 256)
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0 and config.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
    assert deep_ep.Config(20, 6, 256, 6, 100).num_max_rdma_chunked_recv_tokens == 102  # rounded up to the send chunk
    with pytest.raises(ValueRangeError):
        deep_ep.Config(20, 300, 256, 6, 128)
    with pytest.raises(ValueRangeError):
        deep_ep.Buffer.get_dispatch_config(3)
    with pytest.raises(ValueRangeError):
        deep_ep.Buffer.set_num_sms(7)
    deep_ep.Buffer.set_num_sms(24)
    try:
        assert deep_ep.Buffer.get_combine_config(2).num_sms == 24
    finally:
        deep_ep.Buffer.set_num_sms(20)


def test_constructor_needs_a_group_not_an_mpi_communicator():
    with pytest.raises(ArgumentError, match="comm"):
        deep_ep.Buffer(None, comm=object())


def test_fp8_dispatch_carries_packed_ue8m0_scales(world):
    size, results = world
    for rank, out in enumerate(results):
        recv_codes, recv_packed, src_idx, prefix = out["packed_dispatch"]
        assert recv_packed.dtype == torch.int32 and recv_packed.shape == (recv_codes.shape[0], HIDDEN // 512)
        starts = [0] + prefix[:, rank].tolist()
        for source in range(size):
            sent_codes, sent_packed = per_token_cast_to_fp8(inputs(source, size)["x"], use_ue8m0=True, use_packed_ue8m0=True)
            for row in range(starts[source], starts[source + 1]):
                token = int(src_idx[row])
                assert torch.equal(recv_packed[row], sent_packed[token])
                assert torch.equal(recv_codes[row].view(torch.uint8), sent_codes[token].view(torch.uint8))
