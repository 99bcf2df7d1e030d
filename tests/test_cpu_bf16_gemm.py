"""The cpu backend's BF16 GEMMs: torch's bf16 matmul where it is exact, the fp32 matmul elsewhere.

What can go wrong: the bf16 matmul (oneDNN, vdpbf16ps/AMX) flushes subnormal inputs, products and
partial sums to zero, so the range scan that decides between the two must see every tiny value
(every bf16 code is tried), and operands that hold one must give the contract's exact sums.
"""

from __future__ import annotations

import math

import pytest
import torch

import hal
from hal.backends.cpu import gemm_bf16, native
from hal.ops.gemm import get_m_alignment_for_contiguous_layout

_LIB = native.library()
pytestmark = pytest.mark.skipif(_LIB is None, reason=f"native kernels unavailable here: {native.describe(1)[1]}")
BF16 = torch.bfloat16


def _within_fp32_summation(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """got (bf16 or fp32) is the float64 sum rounded once to got's dtype, give or take what an fp32
    sum in any order can differ by (K roundings of 2^-24 of the sum of |terms|)."""
    exact = a.double() @ b.double().T
    terms = a.double().abs() @ b.double().abs().T
    half_ulp = 2.0 ** (-8 if got.dtype == BF16 else -24)  # relative, at most: 8 and 24 significant bits
    bound = half_ulp * exact.abs() + a.shape[1] * 2.0 ** -24 * terms * (1 + 2 * half_ulp) + 1e-300
    assert bool(((got.double() - exact).abs() <= bound).all()), float(((got.double() - exact).abs() / bound).max())


@pytest.mark.skipif(not gemm_bf16.X86_64, reason="the bf16 matmul path (and its scan) runs on x86-64 only")
def test_the_scan_sees_every_tiny_code_and_nothing_else():
    x = torch.zeros(3, 133, dtype=BF16)  # an odd width: the vector loop's tail
    bits = x.view(torch.int16)
    for code in range(1 << 16):
        value = torch.tensor(code, dtype=torch.int32).to(torch.int16)
        bits[1, 131] = value
        magnitude = abs(float(x[1, 131]))
        tiny = magnitude != 0 and magnitude < 2.0 ** -56  # NaN compares False: not tiny
        assert gemm_bf16.bf16_matmul_is_exact(_LIB, x) is (not tiny), hex(code)
    bits[1, 131] = 0
    assert gemm_bf16.bf16_matmul_is_exact(_LIB, x)
    bits[2, 0] = 1  # the smallest subnormal, first element of the last row
    assert not gemm_bf16.bf16_matmul_is_exact(_LIB, x)


@pytest.mark.parametrize("m, n, k", [(1, 7, 128), (37, 200, 256), (130, 96, 1024)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_dense_is_the_fp32_sum_rounded_once(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n + k)
    a = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen) * 3)).to(BF16)
    b = (torch.randn(n, k, generator=gen) * torch.exp(torch.randn(1, k, generator=gen) * 3)).to(BF16)
    out = torch.full((m, n), math.nan, dtype=dtype)
    gemm_bf16.gemm_bf16_nt(_LIB, a, b, out)
    _within_fp32_summation(out, a, b)


def test_other_architectures_take_the_fp32_path(monkeypatch):
    monkeypatch.setattr(gemm_bf16, "X86_64", False)
    x = torch.ones(2, 128, dtype=BF16)
    assert not gemm_bf16.bf16_matmul_is_exact(_LIB, x)


@pytest.mark.skipif(not gemm_bf16.X86_64, reason="the bf16 matmul path runs on x86-64 only")
def test_subnormal_products_are_summed_not_flushed():
    """Every product of 2^-70 values is 2^-140, subnormal in fp32: a bf16 matmul returns zeros
    (vdpbf16ps flushes them), the contract the exact sum; one such row beside ordinary ones."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 256, generator=gen).to(BF16)
    b = torch.randn(8, 256, generator=gen).to(BF16)
    a[1] = 2.0 ** -70
    b[3] = 2.0 ** -70
    b[5, ::2] = -(2.0 ** -70)
    b[5, 1::2] = 2.0 ** -70 * 3
    out = torch.empty(4, 8, dtype=BF16)
    gemm_bf16.gemm_bf16_nt(_LIB, a, b, out)
    expected = (a.float() @ b.float().T).to(BF16)
    assert torch.equal(out, expected)
    assert float(out[1, 3]) == 256 * 2.0 ** -140 and float(out[1, 5]) == 256 * 2.0 ** -140
    # the threshold itself: 2^-56 is not tiny (products 2^-112, every partial sum a multiple of 2^-126)
    a[1] = 2.0 ** -56
    b[3] = 2.0 ** -56
    b[5] = 1.0
    assert gemm_bf16.bf16_matmul_is_exact(_LIB, a, b)
    gemm_bf16.gemm_bf16_nt(_LIB, a, b, out)
    assert float(out[1, 3]) == 256 * 2.0 ** -112


def test_nan_and_inf_propagate():
    a = torch.ones(3, 128, dtype=BF16)
    b = torch.ones(4, 128, dtype=BF16)
    a[0, 5] = math.nan
    a[1, 7] = math.inf
    b[2, 7] = 0.0  # inf * 0: NaN
    out = torch.empty(3, 4, dtype=BF16)
    gemm_bf16.gemm_bf16_nt(_LIB, a, b, out)
    assert torch.isnan(out[0]).all()
    assert torch.isinf(out[1, [0, 1, 3]]).all() and torch.isnan(out[1, 2])
    assert out[2].tolist() == [128, 128, 127, 128]


def test_grouped_layouts_write_their_rows_only():
    gen = torch.Generator().manual_seed(2)
    align = get_m_alignment_for_contiguous_layout()
    groups, n, k = 3, 72, 256
    b = torch.randn(groups, n, k, generator=gen).to(BF16)
    m_indices = torch.tensor([0] * align + [-1] * align + [2] * align + [0] * align, dtype=torch.int32)
    a = torch.randn(m_indices.numel(), k, generator=gen).to(BF16)
    out = torch.full((m_indices.numel(), n), math.nan, dtype=BF16)
    gemm_bf16.m_grouped_contiguous(_LIB, a, b, out, m_indices)
    for start in range(0, m_indices.numel(), align):
        group = int(m_indices[start])
        rows = slice(start, start + align)
        if group < 0:
            assert torch.isnan(out[rows].float()).all()
        else:
            _within_fp32_summation(out[rows], a[rows], b[group])
    masked_m = torch.tensor([5, 0, 17], dtype=torch.int32)
    a3 = torch.randn(groups, 20, k, generator=gen).to(BF16)
    a3[1, 0, 0] = 1e-30  # a tiny value in a row nobody reads: the scan reads all of a, so the fp32 path; the same sums
    out3 = torch.full((groups, 20, n), math.nan, dtype=BF16)
    gemm_bf16.m_grouped_masked(_LIB, a3, b, out3, masked_m)
    for g, rows in enumerate(masked_m.tolist()):
        _within_fp32_summation(out3[g, :rows], a3[g, :rows], b[g])
        assert torch.isnan(out3[g, rows:].float()).all()


def test_auto_selection_gives_cpu_tensors_the_cpu_bf16_gemm(monkeypatch):
    monkeypatch.delenv("HAL_BACKEND", raising=False)
    monkeypatch.delenv("HAL_BACKEND_GEMM_BF16_NT", raising=False)
    if not native.expected_fast():
        pytest.skip("the cpu backend ranks below opencl here (no AVX-512 BF16 fast path)")
    from hal import selection

    chosen = selection.select("gemm_bf16_nt", "cpu")
    assert chosen.backend.name == "cpu", chosen.reason
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(33, 256, generator=gen).to(BF16), torch.randn(40, 256, generator=gen).to(BF16)
    d = torch.empty(33, 40, dtype=BF16)
    hal.bf16_gemm_nt(a, b, d)
    _within_fp32_summation(d, a, b)
