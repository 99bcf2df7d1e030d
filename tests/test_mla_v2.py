"""FlashMLA's DeepSeek-V3.2 API: the FP8 KV cache, sparse decode with top-k indices, attention
sinks, the extra cache, the schedule object and the sparse prefill, each against an independent
computation written as FlashMLA's own test reference does it."""

from __future__ import annotations

import math

import pytest
import torch

import hal
import hal.compat.flash_mla as flash_mla
from hal.conformance.case import judge
from hal.ops.mla_fp8_cache import FP8_TOKEN_BYTES

D = 576


def _cache(blocks: int, seed: int) -> torch.Tensor:
    return (torch.randn(blocks, 64, 1, D, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)


def test_fp8_cache_layout_round_trip():
    bf16 = _cache(3, 0)
    fp8 = hal.quantize_mla_kv_cache(bf16)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (3, 64, 1, FP8_TOKEN_BYTES)
    raw = fp8.view(torch.uint8).view(3, 64, FP8_TOKEN_BYTES)
    scales = raw[..., 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales), "scales are powers of two (UE8M0 in fp32)"
    assert torch.equal(raw[..., 528:].contiguous().view(torch.bfloat16), bf16[:, :, 0, 512:]), "rope is kept as is"
    back = hal.dequantize_mla_kv_cache(fp8)
    latent_error = (back[..., :512] - bf16[..., :512].float()).abs() / scales.repeat_interleave(128, -1).unsqueeze(2)
    assert float(latent_error.max()) <= 16.0, "within e4m3 rounding of value / scale (at most 448 / 32)"
    # FlashMLA's test allocates blocks with a gap between them: the same cache, read the same.
    padded = torch.empty(3, 65, FP8_TOKEN_BYTES, dtype=torch.float8_e4m3fn)[:, :64]
    padded.copy_(fp8.view(3, 64, FP8_TOKEN_BYTES))
    assert torch.equal(hal.dequantize_mla_kv_cache(padded.view(3, 64, 1, FP8_TOKEN_BYTES)), back)


def _independent_sparse(q, keys, indices, topk_length, sink, extra_keys=None, extra_indices=None):
    """As FlashMLA's tests/ref.py: gather (clamped), mask invalid with -inf, logsumexp, sink, lonely rows."""
    b, s_q, h_q, _ = q.shape

    def scope(flat, idx, length):
        topk = idx.shape[-1]
        gathered = flat.index_select(0, idx.clamp_min(0).view(-1).long()).view(b, s_q, topk, D)
        invalid = idx == -1
        if length is not None:
            invalid |= torch.arange(topk).view(1, 1, topk) >= length.view(b, 1, 1)
        return gathered, invalid

    gathered, invalid = scope(keys, indices, topk_length)
    if extra_keys is not None:
        g2, i2 = scope(extra_keys, extra_indices, None)
        gathered, invalid = torch.cat([gathered, g2], 2), torch.cat([invalid, i2], 2)
    weight = torch.einsum("bshd,bskd->bshk", q.double(), gathered.double()) * D**-0.5
    weight = weight.masked_fill(invalid[:, :, None, :], -math.inf)
    lse = weight.logsumexp(-1)
    out = torch.einsum("bshk,bskd->bshd", torch.exp(weight - lse[..., None]), gathered[..., :512].double())
    if sink is not None:
        out = out * (1.0 / (1.0 + torch.exp(sink.double().view(1, 1, h_q) - lse)))[..., None]
    lonely = lse == -math.inf
    out[lonely] = 0.0
    lse[lonely] = math.inf
    return out, lse.transpose(1, 2)


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("with_extra", [False, True])
def test_sparse_decode_matches_flashmlas_reference(fp8, with_extra):
    g = torch.Generator().manual_seed(3)
    b, s_q, h_q, topk = 2, 2, 16, 40
    cache = _cache(4, 1)
    stored = hal.quantize_mla_kv_cache(cache) if fp8 else cache
    keys = hal.dequantize_mla_kv_cache(stored).view(-1, D) if fp8 else cache.view(-1, D).float()
    q = torch.randn(b, s_q, h_q, D, generator=g).to(torch.bfloat16)
    indices = torch.randint(0, 4 * 64, (b, s_q, topk), generator=g, dtype=torch.int32)
    indices[0, 0, 10:] = -1
    indices[1, 1] = -1
    topk_length = torch.tensor([30, 40], dtype=torch.int32)
    sink = torch.randn(h_q, generator=g)
    sink[0], sink[1] = math.inf, -math.inf
    extra = dict()
    extra_keys = extra_idx = None
    if with_extra:
        extra_cache = _cache(1, 2)
        extra_stored = hal.quantize_mla_kv_cache(extra_cache) if fp8 else extra_cache
        extra_keys = hal.dequantize_mla_kv_cache(extra_stored).view(-1, D) if fp8 else extra_cache.view(-1, D).float()
        extra_idx = torch.randint(-1, 64, (b, s_q, 8), generator=g, dtype=torch.int32)
        extra = {"extra_k_cache": extra_stored, "extra_indices_in_kvcache": extra_idx}
    schedule, none = flash_mla.get_mla_metadata()
    assert none is None and isinstance(schedule, flash_mla.FlashMLASchedMeta)
    out, lse = flash_mla.flash_mla_with_kvcache(
        q, stored, None, None, 512, schedule, None, is_fp8_kvcache=fp8, indices=indices, attn_sink=sink, topk_length=topk_length, **extra
    )
    want_out, want_lse = _independent_sparse(q, keys, indices, topk_length, sink, extra_keys, extra_idx)
    assert all(m.passed for m in judge("mla_decode_v2", "out", out.float(), want_out.float())), judge("mla_decode_v2", "out", out.float(), want_out.float())
    assert all(m.passed for m in judge("mla_decode_v2", "lse", lse, want_lse.float()))
    assert (out[:, :, 0] == 0).all(), "a +inf sink zeroes the head"
    if not with_extra:
        assert (out[1, 1] == 0).all() and torch.isposinf(lse[1, :, 1]).all(), "a row with every index -1: out 0, lse +inf"


def test_dense_decode_with_fp8_cache_and_sink_equals_dequantised_dense_decode():
    cache = _cache(4, 5)
    fp8 = hal.quantize_mla_kv_cache(cache)
    dequantised = hal.dequantize_mla_kv_cache(fp8).to(torch.bfloat16)  # exact: fp8 x power of two fits bf16
    q = torch.randn(2, 2, 16, D, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    seqlens = torch.tensor([100, 1], dtype=torch.int32)
    metadata, splits = hal.get_mla_metadata(seqlens, 32, 1)
    with hal.use_backend("reference"):  # the same numerics on both sides: the results must be identical
        plain_out, plain_lse = hal.flash_mla_with_kvcache(q, dequantised, table, seqlens, 512, metadata, splits, causal=True)
        schedule, _ = hal.get_mla_metadata()
        out, lse = hal.flash_mla_with_kvcache(q, fp8, table, seqlens, 512, schedule, None, causal=True, is_fp8_kvcache=True)
    assert torch.equal(lse, plain_lse) and torch.equal(out, plain_out)
    assert (out[1, 0] == 0).all() and torch.isposinf(lse[1, :, 0]).all(), "causal query before the first key"
    sink = torch.full((16,), -math.inf)
    for backend in ("reference", "opencl") if hal.get_backend("opencl").available else ("reference",):
        with hal.use_backend(backend):
            plain, _ = hal.flash_mla_with_kvcache(q, fp8, table, seqlens, 512, hal.get_mla_metadata()[0], None, causal=True, is_fp8_kvcache=True)
            sunk, _ = hal.flash_mla_with_kvcache(q, fp8, table, seqlens, 512, hal.get_mla_metadata()[0], None, causal=True, is_fp8_kvcache=True, attn_sink=sink)
        assert torch.equal(sunk, plain), f"a -inf sink changes nothing ({backend})"


def test_the_schedule_object_is_filled_on_first_use_and_checked_after():
    cache = _cache(2, 7)
    q = torch.randn(2, 1, 16, D).to(torch.bfloat16)
    table = torch.arange(2, dtype=torch.int32).view(2, 1)
    seqlens = torch.tensor([50, 64], dtype=torch.int32)
    schedule, _ = hal.get_mla_metadata()
    out, _ = hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, schedule, None)
    assert schedule.have_initialized and schedule.tile_scheduler_metadata is not None
    metadata, splits = hal.get_mla_metadata(seqlens, 16, 1)
    v1_out, _ = hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, metadata, splits)
    assert torch.equal(out, v1_out)
    with pytest.raises(hal.ArgumentError, match="b=2"):
        hal.flash_mla_with_kvcache(q[:1], cache, table[:1], seqlens[:1], 512, schedule, None)
    with pytest.raises(hal.ArgumentError, match="num_splits"):
        hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, hal.get_mla_metadata()[0], splits)
    # FlashMLA's Config, with the cache's page size and KV heads checked on reuse too
    assert schedule.config == hal.MLASchedule.Config(b=2, s_q=1, h_q=16, page_block_size=64, h_k=1, causal=False, is_fp8_kvcache=False,
                                                     topk=None, extra_page_block_size=None, extra_topk=None)
    halved = cache.view(cache.shape[0] * 2, 32, 1, D)
    with pytest.raises(hal.ArgumentError, match="page_block_size=64"):
        hal.flash_mla_with_kvcache(q, halved, table, seqlens, 512, schedule, None)


def test_scales_may_be_numpy_floats_as_flashmla_takes_them():
    np = pytest.importorskip("numpy")
    q, kv = torch.randn(2, 16, D).to(torch.bfloat16), torch.randn(5, 1, D).to(torch.bfloat16)
    indices = torch.tensor([[[0, 3]], [[1, -1]]], dtype=torch.int32)
    want = hal.flash_mla_sparse_fwd(q, kv, indices, D**-0.5)
    got = hal.flash_mla_sparse_fwd(q, kv, indices, np.float32(D**-0.5))
    assert torch.allclose(got[0].float(), want[0].float(), atol=1e-2)
    cache = torch.randn(2, 64, 1, D).to(torch.bfloat16)
    dq = torch.randn(1, 1, 16, D).to(torch.bfloat16)
    table, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([100], dtype=torch.int32)
    out, _ = hal.flash_mla_with_kvcache(dq, cache, table, lens, 512, *hal.get_mla_metadata(lens, 16, 1), softmax_scale=np.float32(0.05))
    ref, _ = hal.flash_mla_with_kvcache(dq, cache, table, lens, 512, *hal.get_mla_metadata(lens, 16, 1), softmax_scale=float(np.float32(0.05)))
    assert torch.equal(out, ref)
    with pytest.raises(hal.ValueRangeError, match="softmax_scale"):
        hal.flash_mla_with_kvcache(dq, cache, table, lens, 512, *hal.get_mla_metadata(lens, 16, 1), softmax_scale=np.float32("nan"))


@pytest.mark.parametrize("d_v, error", [(512.0, hal.DTypeError), (256, hal.ValueRangeError), (True, hal.DTypeError)])
def test_sparse_prefill_takes_d_v_as_the_int_512(d_v, error):
    q, kv = torch.randn(2, 16, D).to(torch.bfloat16), torch.randn(5, 1, D).to(torch.bfloat16)
    indices = torch.tensor([[[0, 3]], [[1, -1]]], dtype=torch.int32)
    with pytest.raises(error, match="'d_v'"):
        hal.flash_mla_sparse_fwd(q, kv, indices, D**-0.5, d_v=d_v)


@pytest.mark.parametrize("which", ["k_cache", "extra_k_cache"])
def test_sparse_caches_hold_one_kv_head(which):
    q = torch.randn(1, 1, 16, D).to(torch.bfloat16)
    one, two = torch.randn(2, 64, 1, D).to(torch.bfloat16), torch.randn(1, 4, 2, D).to(torch.bfloat16)
    indices = torch.tensor([[[0, 1, -1, -1]]], dtype=torch.int32)
    cache, extra = (two, one) if which == "k_cache" else (one, two)
    with pytest.raises(hal.ShapeError, match=f"'{which}' expected h_kv = 1"):
        hal.flash_mla_with_kvcache(q, cache, None, None, 512, hal.get_mla_metadata()[0], None, indices=indices,
                                   extra_k_cache=extra, extra_indices_in_kvcache=indices)


def test_a_tensor_flag_gets_no_layout_key_and_is_checked_every_call():
    """causal given as a 0-d tensor: a signature keys a tensor by its layout, not its value, so a
    repeated layout must not let tensor(True) past the sparse mode's check or a bound schedule."""
    cache = hal.quantize_mla_kv_cache(_cache(2, 7))
    q = torch.randn(2, 1, 16, D).to(torch.bfloat16)
    indices = torch.tensor([[[0, 5, -1, 70]], [[3, -1, -1, -1]]], dtype=torch.int32)
    schedule, _ = hal.get_mla_metadata()
    for _ in range(2):  # the second call repeats the first's layout
        hal.flash_mla_with_kvcache(q, cache, None, None, 512, schedule, None, causal=torch.tensor(False), is_fp8_kvcache=True, indices=indices)
    with pytest.raises(hal.ArgumentError, match="causal"):  # the schedule was bound with causal=False
        hal.flash_mla_with_kvcache(q, cache, None, None, 512, schedule, None, causal=torch.tensor(True), is_fp8_kvcache=True, indices=indices)
    two = torch.randn(2, 2, 16, D).to(torch.bfloat16)  # causal means something from s_q = 2
    pairs = indices.expand(2, 2, 4).contiguous()
    for causal in (False, torch.tensor(False)):
        hal.flash_mla_with_kvcache(two, cache, None, None, 512, hal.get_mla_metadata()[0], None, causal=causal, is_fp8_kvcache=True, indices=pairs)
    with pytest.raises(hal.ValueRangeError, match="causal"):  # sparse indices choose the keys
        hal.flash_mla_with_kvcache(two, cache, None, None, 512, hal.get_mla_metadata()[0], None, causal=torch.tensor(True),
                                   is_fp8_kvcache=True, indices=pairs)


def test_flash_mla_compat_takes_every_get_mla_metadata_form():
    from hal.compat import flash_mla
    from hal.compat.flash_mla.flash_mla_interface import FlashMLASchedMeta

    seqlens = torch.tensor([50, 64], dtype=torch.int32)
    for args, kwargs in (((), {}), ((seqlens, 16, 1), {}), ((seqlens, 16, 1, 16, True, 64), {}),
                         ((seqlens,), {"num_q_tokens_per_head_k": 16, "num_heads_k": 1, "num_heads_q": 16, "is_fp8_kvcache": True, "topk": 64})):
        schedule, splits = flash_mla.get_mla_metadata(*args, **kwargs)
        assert isinstance(schedule, FlashMLASchedMeta) and splits is None and not schedule.have_initialized
    cache = _cache(2, 7)
    q = torch.randn(2, 1, 16, D).to(torch.bfloat16)
    table = torch.arange(2, dtype=torch.int32).view(2, 1)
    metadata, splits = flash_mla.get_mla_metadata(seqlens, 16, 1)  # FlashMLA 1.0 code, unchanged
    out, _ = flash_mla.flash_mla_with_kvcache(q, cache, table, seqlens, 512, metadata, splits)
    assert torch.equal(out, hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, *hal.get_mla_metadata(seqlens, 16, 1))[0])
    assert metadata.config.b == 2 and metadata.config.page_block_size == 64


def _with_index(value: int):
    return lambda a: {"indices": a["indices"].clone().index_fill_(2, torch.tensor([3]), value)}


@pytest.mark.parametrize(
    "change, error, argument",
    [
        (lambda a: {"causal": True}, hal.ValueRangeError, "causal"),
        (_with_index(128), hal.ValueRangeError, "indices"),
        (_with_index(-2), hal.ValueRangeError, "indices"),
        (lambda a: {"topk_length": torch.tensor([41, 0], dtype=torch.int32)}, hal.ValueRangeError, "topk_length"),
        (lambda a: {"attn_sink": torch.zeros(15)}, hal.ShapeError, "attn_sink"),
        (lambda a: {"attn_sink": torch.zeros(16, dtype=torch.float64)}, hal.DTypeError, "attn_sink"),
        (lambda a: {"extra_k_cache": a["cache"]}, hal.ArgumentError, "extra_indices_in_kvcache"),
        (lambda a: {"is_fp8_kvcache": False}, hal.DTypeError, "k_cache"),
        (lambda a: {"head_dim_v": 256}, hal.ValueRangeError, "head_dim_v"),
        (lambda a: {"q": a["q"].float()}, hal.DTypeError, "q"),
        (lambda a: {"q": a["q"][..., :500]}, hal.ShapeError, "q"),
        (lambda a: {"q": a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)}, hal.LayoutError, "q"),
        (lambda a: {"q": torch.tensor(1.0, dtype=torch.bfloat16)}, hal.ShapeError, "q"),
    ],
    ids=["causal", "index_past_cache", "index_minus_2", "topk_length_past_topk", "sink_shape", "sink_dtype", "extra_without_indices", "fp8_without_flag",
         "head_dim_v", "q_dtype", "q_width", "q_strided", "q_0d"],
)
def test_v32_arguments_are_checked(change, error, argument):
    # A valid call first: layouts that passed are remembered, and must not excuse a changed argument.
    fp8 = hal.quantize_mla_kv_cache(_cache(2, 8))
    q = torch.randn(2, 2, 16, D).to(torch.bfloat16)
    args = {"is_fp8_kvcache": True, "indices": torch.randint(0, 128, (2, 2, 40), dtype=torch.int32)}
    hal.flash_mla_with_kvcache(q, fp8, None, None, 512, hal.get_mla_metadata()[0], None, **args)
    args.update(change({**args, "cache": fp8, "q": q}))
    q, head_dim_v = args.pop("q", q), args.pop("head_dim_v", 512)
    with pytest.raises(error) as info:
        hal.flash_mla_with_kvcache(q, fp8, None, None, head_dim_v, hal.get_mla_metadata()[0], None, **args)
    assert info.value.argument == argument


def test_sparse_prefill_matches_flashmlas_reference():
    g = torch.Generator().manual_seed(9)
    s_q, s_kv, h_q, h_kv, topk = 7, 60, 32, 2, 12
    q = torch.randn(s_q, h_q, D, generator=g).to(torch.bfloat16)
    kv = torch.randn(s_kv, h_kv, D, generator=g).to(torch.bfloat16)
    indices = torch.randint(-1, s_kv + 4, (s_q, h_kv, topk), generator=g, dtype=torch.int32)
    indices[2] = -1
    sink = torch.randn(h_q, generator=g)
    topk_length = torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, D**-0.5, attn_sink=sink, topk_length=topk_length)
    group = h_q // h_kv
    for t in range(s_q):
        for head in range(h_q):
            row = indices[t, head // group, : int(topk_length[t])]
            row = row[(row >= 0) & (row < s_kv)].long()
            if row.numel() == 0:
                assert (out[t, head] == 0).all() and math.isinf(float(lse[t, head])) and float(max_logits[t, head]) == -math.inf
                continue
            scores = (kv[row, head // group].double() @ q[t, head].double()) * D**-0.5
            want_lse = torch.logsumexp(scores, 0)
            want = (torch.softmax(scores, 0) @ kv[row, head // group, :512].double()) / (1 + torch.exp(sink[head].double() - want_lse))
            assert abs(float(lse[t, head]) - float(want_lse)) <= 1e-5 * max(1.0, abs(float(want_lse)))
            assert abs(float(max_logits[t, head]) - float(scores.max())) <= 1e-5 * max(1.0, abs(float(scores.max())))
            assert (out[t, head].double() - want).abs().max() <= 8e-3 + (2.01 / 128) * want.abs().max()


@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_sparse_prefill_with_512_wide_heads(backend):
    # FlashMLA's prefill tests run d_qk 512 too: V is then the whole key. Judged against float64.
    from hal.conformance import oracles

    if not hal.registry.backends()[backend].available:
        pytest.skip(f"{backend} is unavailable here")
    g = torch.Generator().manual_seed(11)
    s_q, s_kv, h_q, topk = 4, 60, 16, 24
    q = torch.randn(s_q, h_q, 512, generator=g).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, 512, generator=g).to(torch.bfloat16)
    indices = torch.randint(-1, s_kv + 2, (s_q, 1, topk), generator=g, dtype=torch.int32)
    sink = torch.randn(h_q, generator=g)
    with hal.use_backend(backend):
        out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, 512**-0.5, attn_sink=sink)
    want_out, want_max, want_lse = oracles.sparse_prefill_oracle(q, kv, indices, 512**-0.5, sink, None)
    for name, got, want in (("out", out.float(), want_out.float()), ("max_logits", max_logits, want_max.float()), ("lse", lse, want_lse.float())):
        assert all(m.passed for m in judge("mla_sparse_prefill", name, got, want)), name
    with pytest.raises(hal.ShapeError, match="d_qk"):
        flash_mla.flash_mla_sparse_fwd(q[..., :500], kv[..., :500], indices, 500**-0.5)


def test_model1_cache_layout_and_sparse_decode():
    # FlashMLA's MODEL1_FP8Sparse (d_qk 512): per page, every token's 448 e4m3 + 64 bf16, then every
    # token's 7 UE8M0 scale bytes and a pad; pages padded to a multiple of 576 bytes.
    from hal.ops.mla_fp8_cache import model1_page_bytes, model1_pages

    g = torch.Generator().manual_seed(5)
    blocks, page = 3, 61
    keys = (torch.randn(blocks, page, 1, 512, generator=g) * 4).to(torch.bfloat16)
    cache = hal.quantize_model1_kv_cache(keys)
    assert cache.shape == (blocks, page, 1, 584) and cache.stride() == (model1_page_bytes(page), 584, 584, 1)
    assert model1_page_bytes(page) % 576 == 0 and model1_page_bytes(page) >= page * 584
    raw = model1_pages(cache)
    token = raw[1, 7 * 576 : 8 * 576]  # block 1, slot 7: its data bytes
    assert torch.equal(token[448:].view(torch.bfloat16), keys[1, 7, 0, 448:])  # RoPE kept in bf16
    exponents = raw[1, page * 576 + 7 * 8 : page * 576 + 7 * 8 + 7].to(torch.int32)
    scales = torch.exp2(exponents.float() - 127)
    amax = keys[1, 7, 0, :448].float().abs().view(7, 64).amax(dim=1)
    assert ((scales >= amax / 448) & (scales < 2 * amax / 448 + 1e-30)).all()  # the smallest power of two covering amax / 448
    want = token[:448].view(torch.float8_e4m3fn).float().view(7, 64) * scales[:, None]
    assert torch.equal(hal.dequantize_model1_kv_cache(cache)[1, 7, 0, :448], want.view(448))
    # sparse decode against float64 over the dequantised keys (V is the whole key)
    flat = hal.dequantize_model1_kv_cache(cache).reshape(-1, 512).double()
    q = torch.randn(2, 2, 16, 512, generator=g).to(torch.bfloat16)
    indices = torch.randint(-1, blocks * page, (2, 2, 40), generator=g, dtype=torch.int32)
    indices[1, 1] = -1  # a row that sees no key: out 0, lse +inf
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True, indices=indices)
    for b in range(2):
        for t in range(2):
            row = indices[b, t][indices[b, t] >= 0].long()
            if row.numel() == 0:
                assert (out[b, t] == 0).all() and torch.isinf(lse[b, :, t]).all()
                continue
            scores = q[b, t].double() @ flat[row].T * 512**-0.5
            want_out = torch.softmax(scores, dim=-1) @ flat[row]
            assert all(m.passed for m in judge("mla_decode_v2", "out", out[b, t].float(), want_out.float()))
            assert all(m.passed for m in judge("mla_decode_v2", "lse", lse[b, :, t], torch.logsumexp(scores, dim=-1).float()))
    overlapping = cache.as_strided(cache.shape, (page * 584 - 8, 584, 584, 1))  # pages that overlap: not FlashMLA's layout
    with pytest.raises(hal.LayoutError):
        flash_mla.flash_mla_with_kvcache(q, overlapping, None, None, 512, flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True, indices=indices)
    # The layout is remembered (its pages fit their storage; the call above). The same shape and
    # strides over a storage that ends before the last page does (made by shrinking the storage
    # under a view: torch refuses to make such a view) still raise.
    storage = torch.UntypedStorage(cache.untyped_storage().nbytes())
    short = torch.empty(0, dtype=torch.float8_e4m3fn).set_(storage, cache.storage_offset(), cache.shape, cache.stride())
    storage.resize_(storage.nbytes() - 576)
    with pytest.raises(hal.LayoutError):
        flash_mla.flash_mla_with_kvcache(q, short, None, None, 512, flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True, indices=indices)
    with pytest.raises(hal.HalError):  # a sparse tensor has no storage to measure: a typed error, as before it was remembered
        flash_mla.flash_mla_with_kvcache(q, torch.sparse_coo_tensor(torch.zeros(4, 0, dtype=torch.long), torch.empty(0, dtype=cache.dtype), cache.shape), None, None, 512, flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True, indices=indices)
    with pytest.raises(hal.ShapeError):  # 512-wide queries need the MODEL1 cache and sparse indices
        flash_mla.flash_mla_with_kvcache(q, cache, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 512,
                                         flash_mla.get_mla_metadata()[0], None, is_fp8_kvcache=True)
