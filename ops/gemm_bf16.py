"""DeepGEMM's BF16 GEMMs: dense (nt/nn/tn/tt), MoE m-grouped (contiguous, masked), k-grouped.

``d = a @ b.T (+ c)``: a and b bf16, products exact in fp32 and summed in fp32, ``d`` bf16 or
float32 rounded once (``c`` added in fp32 before that rounding). Layout letters as in
:mod:`hal.ops.gemm_v2`; MN-major operands are made K-major (a copy) before dispatch.

Backends receive (hooks ``hal_gemm_bf16_nt``, ``hal_m_grouped_gemm_bf16_nt_contiguous``,
``hal_m_grouped_gemm_bf16_nt_masked``) bf16 operands K-major and contiguous, K padded with zeros
to a multiple of 128 (zeros add exact zeros), ``out`` bf16 or float32 (masked and contiguous:
bf16) written in place; masked rows past ``masked_m`` untouched; contiguous rows as in
:func:`hal.ops.gemm.rows_by_block` (-1 rows inside a group's aligned block computed with it,
blocks of only -1 rows untouched).
"""

from __future__ import annotations

import torch

from hal.checks import expect_in_range, expect_int, expect_same_device, expect_tensor, values_within
from hal.dispatch import call
from hal.errors import ShapeError
from hal.layouts import Layouts, int_bucket
from hal.operator import declare
from hal.ops import gemm as v1
from hal.ops import gemm_v2

__all__ = [
    "GEMM_BF16_NT", "M_GROUPED_BF16_CONTIGUOUS", "M_GROUPED_BF16_MASKED",
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nn_contiguous", "m_grouped_bf16_gemm_nt_masked",
    "k_grouped_bf16_gemm_tn_contiguous", "gemm_bf16_reference",
]

GEMM_BF16_NT = declare("gemm_bf16_nt", "hal_gemm_bf16_nt", "gemm", "BF16 GEMM, fp32 accumulation, bf16 or float32 out (bf16_gemm_nt)")
M_GROUPED_BF16_CONTIGUOUS = declare(
    "m_grouped_gemm_bf16_nt_contiguous", "hal_m_grouped_gemm_bf16_nt_contiguous", "gemm", "MoE grouped BF16 GEMM, rows grouped by expert"
)
M_GROUPED_BF16_MASKED = declare(
    "m_grouped_gemm_bf16_nt_masked", "hal_m_grouped_gemm_bf16_nt_masked", "gemm", "MoE grouped BF16 GEMM over per-expert slots (masked_m)"
)

BF16 = torch.bfloat16


def gemm_bf16_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bf16 [M, K], b bf16 [N, K] -> float32 [M, N]: exact products, fp32 sums."""
    return a.float() @ b.float().T


def _padded(x: torch.Tensor) -> torch.Tensor:
    return v1._padded_to_blocks(gemm_v2._k_major(x))


def _dense(op: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor | None, transpose_a: bool, transpose_b: bool) -> None:
    if torch.compiler.is_compiling():  # one opaque node (each k-grouped group's too); checks run when the graph runs
        return torch.ops.hal.gemm_bf16_nt(a, b, d, c, gemm_v2.LAYOUTS[(transpose_a, transpose_b)])
    values = (op, a, b, d, c, transpose_a, transpose_b)
    key, known = _LAYOUTS.lookup(values)
    if known is None:
        expect_tensor(op, "a", a, dtypes=BF16, shape=(None, None), dims=("K", "M") if transpose_a else ("M", "K"))
        expect_tensor(op, "b", b, dtypes=BF16, shape=(None, None), dims=("K", "N") if transpose_b else ("N", "K"))
        at = a.transpose(0, 1) if transpose_a else a
        bt = b.transpose(0, 1) if transpose_b else b
        if bt.shape[1] != at.shape[1]:
            raise ShapeError(op, "b", f"K = {at.shape[1]} (a's)", f"K = {bt.shape[1]}", "Give a and b the same K.")
        gemm_v2._output(op, d, c, (at.shape[0], bt.shape[0]), (BF16, torch.float32))
        expect_same_device(op, "a", a, b=b, d=d, c=c)
        known = v1.as_they_are(at, bt)
        _LAYOUTS.remember(values, key, known)
    a = a.transpose(0, 1) if transpose_a else a
    b = b.transpose(0, 1) if transpose_b else b
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    if k == 0:
        d.copy_(c) if c is not None else d.zero_()
        return
    target = d if c is None else torch.empty(m, n, dtype=torch.float32, device=d.device)
    if not known:
        a, b = _padded(a), _padded(b)
    call(GEMM_BF16_NT, "a", a.device, a=a, b=b, out=target)
    if c is not None:
        gemm_v2.write_sum(d, target, c)


def bf16_gemm_nt(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """``d = a @ b.T (+ c)``: a bf16 [M, K], b bf16 [N, K], d bf16/float32 [M, N]."""
    _dense("bf16_gemm_nt", a, b, d, c, False, False)


def bf16_gemm_nn(a, b, d, c=None, compiled_dims: str = "nk") -> None:
    """``d = a @ b (+ c)``: b bf16 [K, N]."""
    _dense("bf16_gemm_nn", a, b, d, c, False, True)


def bf16_gemm_tn(a, b, d, c=None, compiled_dims: str = "mn") -> None:
    """``d = a.T @ b (+ c)``: a bf16 [K, M], b bf16 [K, N]."""
    _dense("bf16_gemm_tn", a, b, d, c, True, True)


def bf16_gemm_tt(a, b, d, c=None, compiled_dims: str = "mn") -> None:
    """``d = a.T @ b.T (+ c)``: a bf16 [K, M], b bf16 [N, K]."""
    _dense("bf16_gemm_tt", a, b, d, c, True, False)


_LAYOUTS = Layouts()  # argument layouts that passed the structural checks (dense and grouped)


def _check_grouped_layouts(op: str, a, b, d, grouped_layout, use_psum_layout: bool, transpose_b: bool) -> None:
    """The structural checks of the contiguous grouped GEMMs (run once per argument layout)."""
    expect_tensor(op, "a", a, dtypes=BF16, shape=(None, None), dims=("M", "K"))
    expect_tensor(op, "b", b, dtypes=BF16, shape=(None, None, None), dims=("G", "K", "N") if transpose_b else ("G", "N", "K"))
    b = b.transpose(1, 2) if transpose_b else b
    m, k = a.shape
    groups, n = b.shape[0], b.shape[1]
    if b.shape[2] != k:
        raise ShapeError(op, "b", f"K = {k} (a's)", f"K = {b.shape[2]}", "Give a and b the same K.")
    gemm_v2._output(op, d, None, (m, n), (BF16,))
    if use_psum_layout:
        expect_tensor(op, "grouped_layout", grouped_layout, dtypes=torch.int32, shape=(groups,), dims=("G",), contiguous=True)
    else:
        expect_tensor(op, "grouped_layout", grouped_layout, dtypes=torch.int32, shape=(m,), dims=("M",), contiguous=True)
    expect_same_device(op, "a", a, b=b, d=d, grouped_layout=grouped_layout)


def _grouped(op: str, a, b, d, grouped_layout, use_psum_layout: bool, transpose_b: bool) -> None:
    if torch.compiler.is_compiling():  # one opaque node; checks run when the graph runs
        return torch.ops.hal.m_grouped_gemm_bf16_nt_contiguous(a, b, d, grouped_layout, use_psum_layout, transpose_b)
    values = (op, a, b, d, grouped_layout, use_psum_layout, transpose_b)
    key, known = _LAYOUTS.lookup(values)
    if known is None:
        _check_grouped_layouts(op, a, b, d, grouped_layout, use_psum_layout, transpose_b)
        known = v1.as_they_are(a, b.transpose(1, 2) if transpose_b else b)
        _LAYOUTS.remember(values, key, known)
    b = b.transpose(1, 2) if transpose_b else b
    m = a.shape[0]
    groups, n = b.shape[0], b.shape[1]
    m_indices = gemm_v2.grouped_rows(op, grouped_layout, m, groups, use_psum_layout, "a")
    if m == 0 or n == 0:
        return
    if not known:
        a, b = _padded(a), _padded(b)
    call(M_GROUPED_BF16_CONTIGUOUS, "a", a.device, a=a, b=b, out=d, m_indices=m_indices)


def m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, compiled_dims: str = "nk", use_psum_layout: bool = False,
                                      ensure_zero_padding: bool = True, expected_m_for_psum_layout: int | None = None) -> None:
    """MoE grouped: ``d[r] = a[r] @ b[g(r)].T``; a bf16 [M, K], b bf16 [G, N, K], d bf16 [M, N];
    grouped_layout m_indices [M] (-1 padding) or, with use_psum_layout, cumulative row ends [G]."""
    _grouped("m_grouped_bf16_gemm_nt_contiguous", a, b, d, grouped_layout, use_psum_layout, False)


def m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout, compiled_dims: str = "nk", use_psum_layout: bool = False,
                                      ensure_zero_padding: bool = True) -> None:
    """As :func:`m_grouped_bf16_gemm_nt_contiguous` with b bf16 [G, K, N]."""
    _grouped("m_grouped_bf16_gemm_nn_contiguous", a, b, d, grouped_layout, use_psum_layout, True)


def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims: str = "nk") -> None:
    """MoE masked: ``d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``; a bf16 [G, M_max, K], b bf16 [G, N, K], d bf16 [G, M_max, N]."""
    op = "m_grouped_bf16_gemm_nt_masked"
    if torch.compiler.is_compiling():  # one opaque node; checks run when the graph runs
        return torch.ops.hal.m_grouped_gemm_bf16_nt_masked(a, b, d, masked_m, expected_m)
    values = (op, a, b, d, masked_m, int_bucket(expected_m, 1))  # expected_m may change every step
    key, known = _LAYOUTS.lookup(values)
    if known is None:
        expect_tensor(op, "a", a, dtypes=BF16, shape=(None, None, None), dims=("G", "M_max", "K"))
        expect_tensor(op, "b", b, dtypes=BF16, shape=(a.shape[0], None, a.shape[2]), dims=("G", "N", "K"))
        gemm_v2._output(op, d, None, (a.shape[0], a.shape[1], b.shape[1]), (BF16,))
        expect_tensor(op, "masked_m", masked_m, dtypes=torch.int32, shape=(a.shape[0],), dims=("G",))
        expect_int(op, "expected_m", expected_m, minimum=1)
        expect_same_device(op, "a", a, b=b, d=d, masked_m=masked_m)
        known = v1.as_they_are(a, b)
        _LAYOUTS.remember(values, key, known)
    groups, m_max, _ = a.shape
    n = b.shape[1]
    if not values_within(masked_m, 0, m_max + 1):
        expect_in_range(op, "masked_m", masked_m, 0, m_max + 1, what=f"row counts (at most M_max={m_max})", fix="Clamp masked_m to M_max.")
    if groups == 0 or m_max == 0 or n == 0:
        return
    if not known:
        a, b = _padded(a), _padded(b)
    call(M_GROUPED_BF16_MASKED, "a", a.device, a=a, b=b, out=d, masked_m=masked_m, expected_m=expected_m)


def k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, compiled_dims: str = "mn", use_psum_layout: bool = False) -> None:
    """Weight gradients per expert: ``d[g] = c[g] + a_g.T @ b_g`` where a bf16 [sum_k, M] and b bf16
    [sum_k, N] hold each group's K rows in turn (see :func:`hal.ops.gemm_v2.k_grouped_segments`);
    d float32 [G, M, N]; ``c`` (float32, may be d) is required, as DeepGEMM requires it."""
    op = "k_grouped_bf16_gemm_tn_contiguous"
    if use_psum_layout and torch.compiler.is_compiling():  # the ends are read on the host: one node reads them when the graph runs
        return torch.ops.hal.k_grouped_bf16_gemm_tn_psum(a, b, d, c, grouped_layout)
    expect_tensor(op, "a", a, dtypes=BF16, shape=(None, None), dims=("sum_k", "M"))
    expect_tensor(op, "b", b, dtypes=BF16, shape=(a.shape[0], None), dims=("sum_k", "N"))
    segments = gemm_v2.k_grouped_segments(op, ks_cpu, grouped_layout, a.shape[0], use_psum_layout)
    groups, m, n = len(segments), a.shape[1], b.shape[1]
    gemm_v2._output(op, d, c, (groups, m, n), (torch.float32,))
    if c is None:
        raise ShapeError(op, "c", "a float32 [G, M, N] accumulator (DeepGEMM requires it)", "None", "Pass c (it may be d itself).")
    for g, (start, end) in enumerate(segments):
        _dense(op, a[start:end], b[start:end], d[g], c[g], True, True)
