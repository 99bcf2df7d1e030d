"""The cpu backend's native FP8 casts against the reference, code for code and scale for scale.

The reference's numerics hide two traps that a re-implementation meets on bf16 inputs: torch
evaluates ``448.0 / amax`` as a reciprocal then a product, and bf16's short mantissas put many
products exactly on an e4m3 tie, where that last fp32 bit decides the code. Every bf16 and fp16
bit pattern goes through both casts here. NaN codes and NaN scales are compared as NaN: their sign
bit follows the operand order of a multiply (torch's own vectorised product picks one).
"""

from __future__ import annotations

import math

import pytest
import torch

import hal
from hal.backends.cpu import casts, native
from hal.ops.fp8_quant import per_block_cast_reference, per_token_cast_reference

_LIB = native.library()
pytestmark = pytest.mark.skipif(_LIB is None, reason=f"native kernels unavailable here: {native.describe(1)[1]}")


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    codes, want = got[0].view(torch.uint8), expected[0].view(torch.uint8)
    nan = (want & 0x7F) == 0x7F
    assert torch.equal((codes & 0x7F) == 0x7F, nan), "NaN codes differ"
    wrong = (codes != want) & ~nan
    assert not bool(wrong.any()), f"{int(wrong.sum())} codes differ, first at {wrong.nonzero()[0].tolist()}"
    scales, want_scales = got[1], expected[1]
    assert torch.equal(torch.isnan(scales), torch.isnan(want_scales)), "NaN scales differ"
    finite = ~torch.isnan(want_scales)
    assert torch.equal(scales[finite].view(torch.int32), want_scales[finite].view(torch.int32)), "scales differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_bit_pattern_casts_as_the_reference(dtype):
    codes = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    shuffled = codes[torch.randperm(1 << 16, generator=torch.Generator().manual_seed(0))]
    for x in (codes.reshape(512, 128), shuffled.reshape(512, 128), shuffled.reshape(256, 256)):
        _assert_same(casts.per_token_cast(_LIB, x), per_token_cast_reference(x))
        _assert_same(casts.per_block_cast(_LIB, x), per_block_cast_reference(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, k", [(1, 128), (5, 256), (130, 384), (64, 7168)])
def test_per_token_matches_the_reference(dtype, m, k):
    gen = torch.Generator().manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen) * 4)).to(dtype)
    x[0, min(3, k - 1)] = math.nan
    if m > 3:
        x[1, -1] = math.inf
        x[2, :128] = 0.0  # an all-zero group: amax floored at 1e-4
        x[3, :128] = 1e-6  # below the floor
    _assert_same(casts.per_token_cast(_LIB, x), per_token_cast_reference(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(1, 1), (5, 200), (128, 128), (133, 347), (300, 1031)])
def test_per_block_matches_the_reference_on_partial_edge_blocks(dtype, n, k):
    gen = torch.Generator().manual_seed(n * 13 + k)
    x = (torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen) * 3)).to(dtype)
    if n > 200:
        x[200, 5] = -math.inf
    _assert_same(casts.per_block_cast(_LIB, x), per_block_cast_reference(x))


def test_row_strided_inputs():
    gen = torch.Generator().manual_seed(9)
    wide = torch.randn(40, 600, generator=gen).to(torch.bfloat16)
    x = wide[:, 50:562]  # rows 600 apart
    _assert_same(casts.per_token_cast(_LIB, x), per_token_cast_reference(x.contiguous()))
    _assert_same(casts.per_block_cast(_LIB, x), per_block_cast_reference(x))
    columns = wide.t()[:256]  # column stride 600: copied first
    _assert_same(casts.per_block_cast(_LIB, columns), per_block_cast_reference(columns))


def test_the_public_casts_run_here(monkeypatch):
    monkeypatch.delenv("HAL_BACKEND", raising=False)
    if not native.expected_fast():
        pytest.skip("the cpu backend ranks below opencl here")
    assert hal.select("per_token_cast_to_fp8", "cpu").backend.name == "cpu"
    assert hal.select("per_block_cast_to_fp8", "cpu").backend.name == "cpu"
    x = torch.randn(16, 512).to(torch.bfloat16)
    _assert_same(hal.per_token_cast_to_fp8(x), per_token_cast_reference(x))


def _assert_same_records(got: torch.Tensor, expected: torch.Tensor) -> None:
    """FlashMLA FP8 records (codes, 4 fp32 scales, 64 bf16 rope values) equal, NaNs compared as NaN
    (a NaN's bits depend on which of torch's conversions ran: 0x7fc0, 0xffff or its payload)."""
    got, expected = got.view(torch.uint8).reshape(-1, 656), expected.view(torch.uint8).reshape(-1, 656)
    _assert_same((got[:, :512].view(torch.float8_e4m3fn), got[:, 512:528].contiguous().view(torch.float32)),
                 (expected[:, :512].view(torch.float8_e4m3fn), expected[:, 512:528].contiguous().view(torch.float32)))
    rope, want = got[:, 528:].contiguous().view(torch.bfloat16), expected[:, 528:].contiguous().view(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(rope), nan) and torch.equal(rope[~nan].view(torch.int16), want[~nan].view(torch.int16)), "rope differs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mla_kv_cache_records_match_the_reference(dtype):
    from hal.ops.mla_fp8_cache import quantize_mla_kv_cache_reference

    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 64, 1, 576, generator=gen) * torch.exp(torch.randn(3, 64, 1, 1, generator=gen) * 5)).to(dtype)
    x[0, 0, 0, 5] = math.nan  # a NaN tile: NaN scale, NaN codes
    x[0, 1, 0, 300] = math.inf  # an inf tile: inf scale, zeros and a NaN
    x[1, 2, 0, :128] = 0.0  # an all-zero tile: the 1e-4 floor
    x[2, 3, 0, 520] = -math.nan  # a NaN rope value
    for view in (x, x[:, ::3], x[1:]):  # token and block strides
        _assert_same_records(casts.mla_kv_cache(_LIB, view), quantize_mla_kv_cache_reference(view))
    if dtype == torch.float32:  # random bit patterns: every class of fp32 value, NaNs and infs included
        every = torch.randint(-(2**31), 2**31, (114, 1, 1, 576), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    else:  # every bit pattern
        codes = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        every = torch.cat([codes, codes[: 576 * 114 - (1 << 16)]]).reshape(114, 1, 1, 576)
    _assert_same_records(casts.mla_kv_cache(_LIB, every), quantize_mla_kv_cache_reference(every))
    # ue8m0 rounds amax / 448 up to a power of two exactly: one ulp above 448 * 2^-9 takes 2^-8
    edge = torch.full((1, 4, 1, 576), 0.25, dtype=dtype)
    edge[0, 0, 0, 7] = 0.875
    edge[0, 1, 0, 7] = torch.nextafter(torch.tensor(0.875, dtype=torch.float32), torch.tensor(1.0)).to(dtype) if dtype == torch.float32 else 0.87890625
    edge[0, 2, 0, 7] = 448.0 * 2.0 ** -20
    edge[0, 3, 0, 7] = 1e-4 * 448  # at the floor
    got = casts.mla_kv_cache(_LIB, edge)
    _assert_same_records(got, quantize_mla_kv_cache_reference(edge))
    scales = got.view(torch.uint8).reshape(4, 656)[:, 512:516].contiguous().view(torch.float32).flatten()
    assert scales[0] == 2.0 ** -9 and scales[1] == 2.0 ** -8


def test_mla_kv_cache_through_the_api():
    if not native.expected_fast():
        pytest.skip("the cpu backend ranks below opencl here")
    assert hal.select("quantize_mla_kv_cache", "cpu").backend.name == "cpu"
    x = torch.randn(2, 16, 1, 576).to(torch.bfloat16)
    from hal.ops.mla_fp8_cache import quantize_mla_kv_cache_reference

    _assert_same_records(hal.quantize_mla_kv_cache(x), quantize_mla_kv_cache_reference(x))
