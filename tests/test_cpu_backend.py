"""The torch CPU backend (``cpu``): its FP8 GEMMs match the reference's numerics on small shapes
(chunk edges, partial scale blocks, float32 outputs, per-token RHS scales, NaN and inf, empty
groups); auto-selection ranks it between opencl and reference for exactly the operators it
implements, and every other operator falls through as before."""

from __future__ import annotations

import math

import pytest
import torch

import hal
from hal import registry
from hal.backends.cpu import gemm_fp8
from hal.conformance.case import judge
from hal.conformance.catalogue import select_cases
from hal.conformance.runner import run_backend
from hal.ops import gemm
from hal.ops.gemm_reference import blockwise_fp8_matmul

FP8 = torch.float8_e4m3fn
GEMMS = ("gemm_fp8_nt", "m_grouped_gemm_fp8_nt_contiguous", "m_grouped_gemm_fp8_nt_masked")
BF16_GEMMS = ("gemm_bf16_nt", "m_grouped_gemm_bf16_nt_contiguous", "m_grouped_gemm_bf16_nt_masked")
CASTS = ("per_token_cast_to_fp8", "per_block_cast_to_fp8", "quantize_mla_kv_cache")


def _lhs(m: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return hal.per_token_cast_to_fp8(torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen)))


def _rhs(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return hal.per_block_cast_to_fp8(torch.randn(n, k, generator=gen))


def _expected(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """The reference's fp32 result before its final rounding (what conformance judges against)."""
    with hal.use_backend("reference"):
        return blockwise_fp8_matmul(a, sa, b, sb)


def _assert_conforms(op: str, output: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    verdicts = judge(op, output, got, expected)
    assert all(v.passed for v in verdicts), [(v.metric, v.value, v.note) for v in verdicts]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch kernels (not the native ones: tests/test_cpu_native.py has those), in chunks of
    128 columns and 48 rows, so small shapes cross every chunk edge and tail."""
    from hal.backends.cpu import plugin

    monkeypatch.setattr(plugin, "_kernels", lambda: None)
    monkeypatch.setattr(gemm_fp8, "WEIGHT_BYTES", 1)
    monkeypatch.setattr(gemm_fp8, "PARTIAL_BYTES", 1)
    monkeypatch.setattr(gemm_fp8, "M_CHUNK", 48)


@pytest.fixture(params=["torch", "native"])
def grouped_kernels(request: pytest.FixtureRequest) -> None:
    """The grouped layouts through hal's API on each of the backend's kernels: the torch ones in
    small chunks, and the native ones where the library builds (its own file tests them further)."""
    if request.param == "torch":
        request.getfixturevalue("small_chunks")
        return
    from hal.backends.cpu import native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.describe(1)[1]}")


def test_decode_is_exact_for_every_e4m3_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    decoded = gemm_fp8.decode_e4m3(codes)
    expected = codes.float()
    assert torch.equal(torch.isnan(decoded), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(decoded[finite].view(torch.int32), expected[finite].view(torch.int32))  # -0.0 included


@pytest.mark.parametrize("m, n, k", [(1, 128, 128), (5, 200, 384), (100, 300, 256), (17, 1, 512)])
def test_dense_matches_the_reference(m, n, k, small_chunks):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen)
    out = torch.full((m, n), math.nan, dtype=torch.bfloat16)
    with hal.use_backend("cpu"):
        hal.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    _assert_conforms("gemm_fp8_nt", "out", out, _expected(a, sa, b, sb))


def test_k_not_a_multiple_of_128_and_column_major_scales():
    gen = torch.Generator().manual_seed(1)
    k, padded = 320, 384
    a_full, sa = _lhs(9, padded, gen)
    b_full, sb = _rhs(130, padded, gen)
    a_full[:, k:] = 0
    b_full[:, k:] = 0
    tma = torch.empty(sa.shape[1], 12).t()[:9]  # DeepGEMM's column-major scale layout
    tma.copy_(sa)
    out = torch.empty(9, 130, dtype=torch.bfloat16)
    with hal.use_backend("cpu"):
        hal.gemm_fp8_fp8_bf16_nt((a_full[:, :k], tma), (b_full[:, :k].contiguous(), sb), out)
    _assert_conforms("gemm_fp8_nt", "out", out, _expected(a_full, sa, b_full, sb))


def test_float32_out_and_per_token_rhs_scales(small_chunks):
    """Contract version 2: d float32 with accumulation into c, and the (1, 1, 128) recipe."""
    gen = torch.Generator().manual_seed(2)
    (a, sa), (b, _) = _lhs(50, 256, gen), _rhs(260, 256, gen)
    sb = torch.rand(260, 2, generator=gen) + 0.5
    c = torch.randn(50, 260, generator=gen)
    d = torch.empty(50, 260)
    with hal.use_backend("cpu"):
        hal.fp8_gemm_nt((a, sa), (b, sb), d, c=c, recipe=(1, 1, 128))
    _assert_conforms("gemm_fp8_nt", "out_fp32", d, _expected(a, sa, b, sb) + c)


def test_nan_and_inf_propagate_as_in_the_reference():
    gen = torch.Generator().manual_seed(3)
    (a, sa), (b, sb) = _lhs(6, 256, gen), _rhs(140, 256, gen)
    a.view(torch.uint8)[1, 5] = 0x7F  # NaN in a row of A: that output row is NaN
    b.view(torch.uint8)[7, 200] = 0xFF  # NaN in a row of B: that output column is NaN
    sa[3, 1] = math.inf  # an infinite scale: +-inf, or NaN where a block's partial sum is zero
    sb[1, 0] = -math.inf
    a.view(torch.uint8)[3, 128:256] = 0
    out = torch.empty(6, 140, dtype=torch.bfloat16)
    with hal.use_backend("cpu"):
        hal.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    expected = _expected(a, sa, b, sb)
    assert torch.isnan(expected).any() and torch.isinf(expected).any()
    _assert_conforms("gemm_fp8_nt", "out", out, expected)


def test_contiguous_groups_with_an_empty_group_padding_and_a_split_group(grouped_kernels):
    gen = torch.Generator().manual_seed(4)
    groups, n, k = 4, 136, 256
    # group 1 has no rows; group 2's rows come in two runs; -1 rows are padding, one block all of it.
    layout = [0] * 100 + [-1] * 28 + [2] * 128 + [3] * 60 + [-1] * 68 + [-1] * 128 + [2] * 128
    m_indices = torch.tensor(layout, dtype=torch.int32)
    a, sa = _lhs(len(layout), k, gen)
    parts = [_rhs(n, k, gen) for _ in range(groups)]
    b, sb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    out = torch.full((len(layout), n), math.nan, dtype=torch.bfloat16)
    with hal.use_backend("cpu"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    # As DeepGEMM's whole tiles: padding rows after a group's rows are computed with that group.
    computed = torch.tensor([0] * 128 + [2] * 128 + [3] * 128 + [-1] * 128 + [2] * 128, dtype=torch.int32)
    assert torch.equal(gemm.rows_by_block(m_indices), computed)
    for g in (0, 2, 3):
        rows = (computed == g).nonzero().squeeze(1)
        _assert_conforms("m_grouped_gemm_fp8_nt_contiguous", "out", out[rows], _expected(a[rows], sa[rows], b[g], sb[g]))
    assert torch.isnan(out[computed < 0].float()).all()  # a block of padding alone is never written


def test_masked_groups_leave_rows_beyond_the_count_untouched(grouped_kernels):
    gen = torch.Generator().manual_seed(5)
    groups, m_max, n, k = 4, 64, 200, 256
    lhs = [_lhs(m_max, k, gen) for _ in range(groups)]
    rhs = [_rhs(n, k, gen) for _ in range(groups)]
    a, sa = torch.stack([p[0] for p in lhs]), torch.stack([p[1] for p in lhs])
    b, sb = torch.stack([p[0] for p in rhs]), torch.stack([p[1] for p in rhs])
    masked_m = torch.tensor([m_max, 0, 50, 1], dtype=torch.int32)  # full, empty, partial, one row
    out = torch.full((groups, m_max, n), math.nan, dtype=torch.bfloat16)
    with hal.use_backend("cpu"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 32)
    for g, rows in enumerate(masked_m.tolist()):
        if rows:
            _assert_conforms("m_grouped_gemm_fp8_nt_masked", "out", out[g, :rows], _expected(a[g, :rows], sa[g, :rows], b[g], sb[g]))
        assert torch.isnan(out[g, rows:].float()).all()


def test_quick_conformance_passes_on_every_operator_it_implements():
    results = run_backend("cpu", select_cases(quick=True))
    ran = {r.op for r in results if r.status != "unsupported"}
    assert ran == set(GEMMS) | set(BF16_GEMMS) | set(CASTS) | {"ep_combine_reduce", "mla_decode"}
    assert all(r.passed for r in results if r.op in ran), [(r.case_id, r.reason) for r in results if r.op in ran and not r.passed]


def _same_values(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal value for value: NaN where the reference has NaN, equal numbers elsewhere (+0.0 == -0.0)."""
    nan = torch.isnan(expected)
    return got.dtype == expected.dtype and torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], expected[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("copies", ["mixed", "one", "two", "by-source", "by-source-gaps", "by-source-4"])
def test_the_tiled_combine_reduce_is_the_reference_value_for_value(dtype, copies, monkeypatch):
    """Every path (general float32 tiles, one-row and two-row tiles), tile edges, specials, weights."""
    from hal.backends.cpu import ep
    from hal.ops.ep_local import combine_reduce_reference

    monkeypatch.setattr(ep, "TILE_BYTES", 4 * 700 * 7)  # tiles of 7 tokens: 90 tokens cross many edges
    gen = torch.Generator().manual_seed(3)
    tokens = 90
    if copies == "mixed":
        src_idx = torch.randint(0, tokens, (300,), generator=gen, dtype=torch.int32)
    elif copies.startswith("by-source"):  # as combine receives them: per source rank, sorted by token (slices, no gathers)
        second = torch.arange(tokens, dtype=torch.int32)
        if copies.endswith("gaps"):
            second = second[torch.rand(tokens, generator=gen) > 0.1]
        src_idx = torch.cat([torch.arange(tokens, dtype=torch.int32), second] * (2 if copies.endswith("4") else 1))
    else:
        src_idx = torch.arange(tokens, dtype=torch.int32).repeat(1 if copies == "one" else 2)
        src_idx = src_idx[torch.randperm(src_idx.numel(), generator=gen)].contiguous()
    count = src_idx.numel()
    rows = (torch.randn(count, 700, generator=gen) * 100).to(dtype)
    rows[5, 3], rows[7, 9], rows[8, 9], rows[11, 2] = float("nan"), float("inf"), -float("inf"), -0.0
    rows[:, 0] = -0.0  # sums of negative zeros
    rows[12, 1] = torch.finfo(dtype).max
    weights = torch.rand(count, generator=gen)
    for w in (None, weights):
        got, expected = ep.combine_reduce(rows, src_idx, tokens, w), combine_reduce_reference(rows, src_idx, tokens, w)
        assert _same_values(got, expected)
    # Rows read through a strided view (a slice of a wider message) give the same result.
    wide = torch.zeros(count, 800, dtype=dtype)
    wide[:, 50:750] = rows
    assert _same_values(ep.combine_reduce(wide[:, 50:750], src_idx, tokens, None), combine_reduce_reference(rows, src_idx, tokens, None))
    assert ep.combine_reduce(rows[:0], src_idx[:0], 4, None).eq(0).all()
    assert ep.combine_reduce(rows, src_idx, tokens + 5, None)[tokens:].eq(0).all()  # tokens without rows are 0


@pytest.fixture
def without_opencl(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without an OpenCL driver: an empty ICD folder makes opencl unavailable."""
    (tmp_path / "vendors").mkdir()
    monkeypatch.setenv("OCL_ICD_VENDORS", str(tmp_path / "vendors"))
    monkeypatch.delenv("OCL_ICD_FILENAMES", raising=False)
    registry.reload()
    assert not hal.get_backend("opencl").available


@pytest.mark.parametrize("op", GEMMS)
@pytest.mark.parametrize("features", [(), ("fp32_out",), ("b_per_token",)])
def test_without_opencl_auto_selection_gives_cpu_tensors_the_cpu_gemms(op, features, without_opencl):
    assert hal.select(op, "cpu", features=features).backend.name == "cpu"


@pytest.mark.parametrize("op", GEMMS)
def test_cpu_outranks_opencl_only_with_its_native_fast_path(op):
    """Priority order for CPU tensors: cpu (60, the native AVX-512 BF16 kernels), opencl (50),
    cpu (40, the torch kernels), reference (0)."""
    from hal.backends.cpu import native

    opencl, cpu, reference = (registry.backends()[name].priority for name in ("opencl", "cpu", "reference"))
    assert cpu > reference
    assert (cpu > opencl) == native.expected_fast()
    expected = "opencl" if hal.get_backend("opencl").available and opencl > cpu else "cpu"
    assert hal.select(op, "cpu").backend.name == expected


def test_other_operators_fall_through_to_the_backends_below():
    cpu = hal.get_backend("cpu")
    served = set(GEMMS) | set(BF16_GEMMS) | set(CASTS) | {"ep_combine_reduce", "mla_decode"}
    assert sorted(h.removeprefix("hal_") for h in cpu.implemented_hooks()) == sorted(served | {"get_mla_metadata"})  # its MLA schedule
    assert hal.select("ep_combine_reduce", "cpu").backend.name == "cpu", "opencl has none: cpu outranks the numpy example"
    below = sorted((b for b in registry.backends().values() if b.name != "cpu"), key=lambda b: (-b.priority, b.name))
    for op in hal.OPERATORS.values():
        if op.name in served:
            continue
        expected = next(b.name for b in below if b.available and b.implements(op.hook) and b.accepts_device("cpu"))
        assert hal.select(op.name, "cpu").backend.name == expected, op.name


def test_cpu_takes_only_cpu_tensors():
    cpu = hal.get_backend("cpu")
    assert cpu.available and cpu.accepts_device("cpu") and not cpu.accepts_device("cuda")
