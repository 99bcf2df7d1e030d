"""Bit-exact conversions and launch edge cases of the shared Triton kernels."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import e4m3fn_bits_as_fnuz, encode_e4m3fn, round_to
from hal.backends.triton.fp8_cast import per_block_cast, per_token_cast
from hal.backends.triton.fp8_gemm import DENSE, fp8_gemm
from hal.backends.triton.tuning import FP8_E4M3FN, FP8_E4M3FNUZ, GemmConfig, Tuning, interpreter_gemm_config
from hal.ops.fp8_quant import per_block_cast_reference, per_token_cast_reference
from hal.ops.gemm_reference import gemm_fp8_nt_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _encode_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, encode_e4m3fn(tl.load(x_ptr + offsets, mask=mask)), mask=mask)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, round_to(tl.load(x_ptr + offsets, mask=mask), y_ptr.dtype.element_ty, True), mask=mask)


def _edge_values() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[torch.isfinite(codes)].sort().values
    generator = torch.Generator().manual_seed(0)
    spread = torch.cat([torch.randn(20000, generator=generator) * s for s in (1e-4, 1e-2, 1.0, 50.0, 400.0, 1e4)])
    special = torch.tensor([0.0, -0.0, 448.0, 464.0, 465.0, 479.9, 480.0, 1e30, float("inf"), float("-inf"), float("nan"), 2**-6, 2**-9, 2**-10, 3 * 2**-11])
    return torch.cat([finite, (finite[1:] + finite[:-1]) / 2, spread, special])


def test_e4m3fn_encoding_matches_torch_bit_for_bit():
    x = _edge_values().to(DEVICE)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=DEVICE)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, codes, x.numel(), BLOCK=1024)
    expected = x.cpu().to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes.cpu(), expected)


def test_bf16_rounding_is_nearest_even():
    x = _edge_values()
    x = torch.cat([x, torch.randn(50000, generator=torch.Generator().manual_seed(1))]).to(DEVICE)
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.cpu().bfloat16()
    same = (out.cpu().view(torch.int16) == expected.view(torch.int16)) | (expected.isnan() & out.cpu().isnan())
    assert bool(same.all())


@pytest.mark.parametrize("shape", [(1, 128), (3, 512), (257, 256)])
def test_per_token_cast_is_bit_exact(shape):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 30).bfloat16()
    values, scales = per_token_cast(x.to(DEVICE))
    expected_values, expected_scales = per_token_cast_reference(x)
    assert torch.equal(values.cpu().view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales.cpu(), expected_scales)


@pytest.mark.parametrize("shape", [(1, 1), (129, 130), (256, 384)])
def test_per_block_cast_is_bit_exact(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    values, scales = per_block_cast(x.to(DEVICE))
    expected_values, expected_scales = per_block_cast_reference(x)
    assert torch.equal(values.cpu().view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales.cpu(), expected_scales)


@pytest.mark.parametrize("fp8_format", [FP8_E4M3FN, FP8_E4M3FNUZ])
@pytest.mark.parametrize("config", [GemmConfig(16, 32, 4, 1), GemmConfig(32, 128, 4, 1), GemmConfig(64, 64, 4, 1)])
def test_gemm_tile_configs_and_fp8_formats_agree_with_the_reference(config, fp8_format):
    generator = torch.Generator().manual_seed(4)
    a, sa = per_token_cast_reference(torch.randn(70, 256, generator=generator))
    b, sb = per_block_cast_reference(torch.randn(200, 256, generator=generator))
    expected = torch.empty(70, 200, dtype=torch.bfloat16)
    gemm_fp8_nt_reference(a, sa, b, sb, expected)
    out = torch.full((70, 200), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    tuning = Tuning("test", interpreter_gemm_config, fp8_format=fp8_format)
    fp8_gemm(a.to(DEVICE), sa.to(DEVICE), b.to(DEVICE), sb.to(DEVICE), out, tuning=tuning, layout=DENSE, config=config)
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2**-7, atol=1e-3 * float(expected.float().abs().max()))


def test_empty_m_writes_nothing():
    a = torch.empty(0, 128, dtype=torch.float8_e4m3fn, device=DEVICE)
    sa = torch.empty(0, 1, device=DEVICE)
    b, sb = per_block_cast_reference(torch.randn(128, 128))
    out = torch.empty(0, 128, dtype=torch.bfloat16, device=DEVICE)
    fp8_gemm(a, sa, b.to(DEVICE), sb.to(DEVICE), out, tuning=Tuning("test", interpreter_gemm_config))
    assert out.numel() == 0


@triton.jit
def _fnuz_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, e4m3fn_bits_as_fnuz(tl.load(x_ptr + offsets)))


def test_in_kernel_fnuz_mapping_matches_the_host_conversion():
    from hal.backends.rocm.fp8 import e4m3fn_to_e4m3fnuz

    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    mapped = torch.empty_like(codes)
    _fnuz_kernel[(1,)](codes, mapped, BLOCK=256)
    expected, _ = e4m3fn_to_e4m3fnuz(codes.cpu().view(torch.float8_e4m3fn), torch.ones(1))
    assert torch.equal(mapped.cpu(), expected.view(torch.uint8))


@pytest.mark.parametrize("fp8_format", [FP8_E4M3FN, FP8_E4M3FNUZ])
@pytest.mark.parametrize("programs", [1, 3, 1000])
def test_masked_gemm_persistent_walk_equals_the_grid(monkeypatch, programs, fp8_format):
    # A persistent launch walks every group's tiles from a few programs; rows at or past masked_m
    # stay untouched (NaN here) exactly as with one block per tile (1000 programs: the tile grid).
    from hal.backends.triton import fp8_gemm as kernels
    from hal.backends.triton.fp8_gemm import MASKED

    monkeypatch.setattr(kernels, "_persistent_programs", lambda device: programs)
    generator = torch.Generator().manual_seed(9)
    groups, m_max, n, k = 3, 40, 72, 256
    masked_m = torch.tensor([0, 17, 40], dtype=torch.int32)
    a, sa = per_token_cast_reference(torch.randn(groups * m_max, k, generator=generator))
    a, sa = a.view(groups, m_max, k), sa.view(groups, m_max, -1)
    casts = [per_block_cast_reference(torch.randn(n, k, generator=generator)) for _ in range(groups)]
    b, sb = torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])
    out = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    tuning = Tuning("test", interpreter_gemm_config, fp8_format=fp8_format)
    kernels.fp8_gemm(a.to(DEVICE), sa.to(DEVICE), b.to(DEVICE), sb.to(DEVICE), out, tuning=tuning, layout=MASKED,
                     groups=masked_m.to(DEVICE), config=GemmConfig(16, 32, 4, 1))
    out = out.cpu()
    for g in range(groups):
        rows = int(masked_m[g])
        expected = torch.empty(rows, n, dtype=torch.bfloat16)
        gemm_fp8_nt_reference(a[g, :rows], sa[g, :rows], b[g], sb[g], expected)
        if rows:
            scale = float(expected.float().abs().max())
            torch.testing.assert_close(out[g, :rows].float(), expected.float(), rtol=2**-7, atol=1e-3 * scale)
        assert out[g, rows:].isnan().all()
