"""FP8 quantisation and FP8 GEMMs (dense, contiguous grouped, masked grouped) against independent
float64 computations, plus every argument check.

Nothing here calls ``hal.ops.gemm_reference`` or the ``*_reference`` helpers of
``hal.ops.fp8_quant``: the oracles dequantise in float64 and multiply there.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import hal

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
# DeepGEMM clamps a float32 amax tensor at 1e-4, so the floor is the float32 value nearest 1e-4.
AMAX_FLOOR = float(torch.tensor(1e-4, dtype=torch.float32))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's metric: 1 - 2 * sum(x * y) / sum(x * x + y * y), in float64."""
    x, y = x.double(), y.double()
    return 1.0 - 2.0 * float((x * y).sum()) / float((x * x + y * y).sum())


def e4m3_half_ulp(value: torch.Tensor) -> torch.Tensor:
    """Half the e4m3fn spacing at |value| (float64): 3 mantissa bits, min normal exponent -6."""
    exponent = torch.floor(torch.log2(value.abs().clamp(min=2.0**-6)))
    return 2.0 ** (exponent - 3) / 2


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


def quantise_float64(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent blockwise quantisation of x [N, K] with blocks of rows x cols.

    Returns (expected fp8 bytes, expected float32 scales [ceil(N/rows), ceil(K/cols)],
    float64 scaled values x * 448 / amax).
    """
    n, k = x.shape
    x64 = x.double()  # exact for bf16 / fp16 / fp32
    scales = torch.empty(_cdiv(n, rows), _cdiv(k, cols), dtype=torch.float64)
    multiplier32 = torch.empty(n, k, dtype=torch.float32)
    scaled64 = torch.empty(n, k, dtype=torch.float64)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = x64[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
            amax = max(float(tile.abs().max()), AMAX_FLOOR)
            scales[i, j] = amax / E4M3_MAX
            # DeepGEMM's helper writes ``x * (448.0 / amax)`` on a float32 tensor; torch evaluates
            # ``scalar / tensor`` as ``reciprocal(tensor) * scalar``, so the float32 multiplier is
            # 448 * fp32(1 / amax) rounded to fp32 (it can differ from fp32(448 / amax) by one ulp,
            # which moves exact e4m3 ties).
            reciprocal32 = float(torch.tensor(1.0 / amax, dtype=torch.float32))
            multiplier32[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = E4M3_MAX * reciprocal32
            scaled64[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = tile * E4M3_MAX / amax
    # the same float32 values (x in float32 times the float32 multiplier), cast by torch itself
    expected_bytes = (x.float() * multiplier32).to(FP8).view(torch.uint8)
    return expected_bytes, scales.float(), scaled64


def _random_activations(shape, dtype, seed, *, tiny_row: int | None = None, big_row: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).add(0.1) * 3
    if tiny_row is not None and tiny_row < shape[0]:
        x[tiny_row] *= 1e-6  # amax below the 1e-4 floor
    if big_row is not None and big_row < shape[0]:
        x[big_row] *= 1000.0
    return x.to(dtype)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 128), (7, 384), (33, 256)], ids=str)
def test_per_token_cast_matches_float64(shape, dtype):
    x = _random_activations(shape, dtype, seed=shape[0] * 7 + shape[1], tiny_row=2, big_row=4)
    with hal.use_backend("reference"):
        q, s = hal.per_token_cast_to_fp8(x)
    m, k = shape
    assert q.dtype == FP8 and q.shape == (m, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (m, k // BLOCK)

    expected_bytes, expected_scales, scaled64 = quantise_float64(x, 1, BLOCK)
    assert torch.equal(s, expected_scales)
    if m > 2:  # row 2 is below the amax floor: its scale is the floor's
        assert bool((s[2] == torch.tensor(AMAX_FLOOR / E4M3_MAX, dtype=torch.float64).float()).all())
    assert torch.equal(q.view(torch.uint8), expected_bytes)
    # the fp8 value is the float64 scaled value rounded to e4m3 (within half an e4m3 ulp + fp32 noise)
    assert bool(((q.double() - scaled64).abs() <= e4m3_half_ulp(scaled64) * (1 + 1e-6)).all())
    assert float(q.float().abs().max()) <= E4M3_MAX
    # dequantised relative error per element: at most 2**-4 relative (or half a subnormal step)
    dequant = q.double() * s.double().repeat_interleave(BLOCK, dim=1)
    bound = torch.maximum(x.double().abs() * 2.0**-4, s.double().repeat_interleave(BLOCK, dim=1) * 2.0**-10)
    assert bool(((dequant - x.double()).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (1, 130), (257, 384)], ids=str)
def test_per_block_cast_matches_float64(shape, dtype):
    x = _random_activations(shape, dtype, seed=shape[0] * 11 + shape[1], tiny_row=None, big_row=0)
    with hal.use_backend("reference"):
        q, s = hal.per_block_cast_to_fp8(x)
    n, k = shape
    assert q.dtype == FP8 and q.shape == (n, k) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (_cdiv(n, BLOCK), _cdiv(k, BLOCK))

    expected_bytes, expected_scales, scaled64 = quantise_float64(x, BLOCK, BLOCK)
    assert torch.equal(s, expected_scales)
    assert torch.equal(q.view(torch.uint8), expected_bytes)
    assert bool(((q.double() - scaled64).abs() <= e4m3_half_ulp(scaled64) * (1 + 1e-6)).all())
    expanded = s.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    dequant = q.double() * expanded
    rel = float((dequant - x.double()).norm() / x.double().norm())
    assert rel < 0.05


def test_per_block_cast_tiny_block_uses_amax_floor():
    x = (torch.randn(130, 200, generator=torch.Generator().manual_seed(5)) * 1e-7).float()
    x[:128, 128:] *= 1e6  # one block above the floor, three below
    with hal.use_backend("reference"):
        q, s = hal.per_block_cast_to_fp8(x)
    floor_scale = torch.tensor(AMAX_FLOOR / E4M3_MAX, dtype=torch.float64).float()
    assert float(s[0, 0]) == float(floor_scale) and float(s[1, 0]) == float(floor_scale) and float(s[1, 1]) == float(floor_scale)
    assert float(s[0, 1]) > float(floor_scale)
    expected_bytes, expected_scales, _ = quantise_float64(x, BLOCK, BLOCK)
    assert torch.equal(s, expected_scales)
    assert torch.equal(q.view(torch.uint8), expected_bytes)


def test_per_block_cast_accepts_a_transposed_view():
    x = torch.randn(300, 140, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).t()  # [140, 300]
    with hal.use_backend("reference"):
        q, s = hal.per_block_cast_to_fp8(x)
    expected_bytes, expected_scales, _ = quantise_float64(x, BLOCK, BLOCK)
    assert torch.equal(s, expected_scales)
    assert torch.equal(q.view(torch.uint8), expected_bytes)


@pytest.mark.parametrize(
    "fn, x, error, argument",
    [
        ("per_token_cast_to_fp8", lambda: torch.randn(4, 200), hal.ShapeError, "x"),
        ("per_token_cast_to_fp8", lambda: torch.randn(4, 256).to(torch.float64), hal.DTypeError, "x"),
        ("per_token_cast_to_fp8", lambda: torch.randn(256, 4).t(), hal.LayoutError, "x"),
        ("per_token_cast_to_fp8", lambda: torch.randn(2, 4, 256), hal.ShapeError, "x"),
        ("per_block_cast_to_fp8", lambda: torch.randn(256), hal.ShapeError, "x"),
        ("per_block_cast_to_fp8", lambda: torch.randint(0, 5, (128, 128)), hal.DTypeError, "x"),
    ],
    ids=["token_k_200", "token_float64", "token_strided", "token_3d", "block_1d", "block_int"],
)
def test_cast_rejects(fn, x, error, argument):
    with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
        getattr(hal, fn)(x())
    assert info.value.argument == argument


# ---------------------------------------------------------------------------------------------
# Operands and the float64 oracle
# ---------------------------------------------------------------------------------------------


def random_lhs(m: int, k: int, gen: torch.Generator, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    a = (torch.randn(*lead, m, k, generator=gen) * 4).to(FP8)
    sa = torch.rand(*lead, m, k // BLOCK, generator=gen) * 0.05 + 0.01
    return a, sa


def random_rhs(n: int, k: int, gen: torch.Generator, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    b = (torch.randn(*lead, n, k, generator=gen) * 4).to(FP8)
    sb = torch.rand(*lead, _cdiv(n, BLOCK), k // BLOCK, generator=gen) * 0.05 + 0.01
    return b, sb


def product_float64(a, sa, b, sb) -> torch.Tensor:
    """sum_k (A[m,k] sa[m,k//128]) (B[n,k] sb[n//128,k//128]) with both operands dequantised in float64."""
    n = b.shape[0]
    a64 = a.double() * sa.double().repeat_interleave(BLOCK, dim=1)
    b64 = b.double() * sb.double().repeat_interleave(BLOCK, dim=0)[:n].repeat_interleave(BLOCK, dim=1)
    return a64 @ b64.T


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not bool(torch.isnan(out).any())
    assert calc_diff(out, ref) < 1e-3
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


def scales_layout(sa: torch.Tensor, layout: str) -> torch.Tensor:
    m, kb = sa.shape
    if layout == "row_major":
        return sa
    if layout == "col_major":
        result = sa.t().contiguous().t()
        if m == 1:  # torch normalises the strides of size-1 dims; force the column-major strides
            result = torch.empty_strided((m, kb), (1, m), dtype=sa.dtype).copy_(sa)
    else:  # DeepGEMM's TMA-aligned column-major layout: M padded to a multiple of 4 (16 bytes)
        storage = torch.full((kb, _cdiv(m, 4) * 4), math.nan, dtype=torch.float32)
        storage[:, :m] = sa.t()
        result = storage[:, :m].t()
    assert result.shape == sa.shape and result.stride(0) == 1 and torch.equal(result, sa)
    return result


# ---------------------------------------------------------------------------------------------
# Dense GEMM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["row_major", "col_major", "tma_aligned"])
@pytest.mark.parametrize("n, k", [(200, 128), (200, 384), (128, 384), (64, 256)], ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 7, 129])
def test_dense_gemm_matches_float64(m, n, k, layout):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    a, sa = random_lhs(m, k, gen)
    b, sb = random_rhs(n, k, gen)
    out = torch.full((m, n), math.nan, dtype=torch.bfloat16)  # must be fully overwritten
    with hal.use_backend("reference"):
        result = hal.gemm_fp8_fp8_bf16_nt((a, scales_layout(sa, layout)), (b, sb), out)
    assert result is None
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert_gemm_close(out, product_float64(a, sa, b, sb))


def test_dense_gemm_with_library_quantisation():
    """End to end: quantise bf16 operands with the library and compare to the bf16 product."""
    gen = torch.Generator().manual_seed(77)
    x = torch.randn(65, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(200, 256, generator=gen).to(torch.bfloat16)
    out = torch.empty(65, 200, dtype=torch.bfloat16)
    with hal.use_backend("reference"):
        lhs = hal.per_token_cast_to_fp8(x)
        rhs = hal.per_block_cast_to_fp8(w)
        hal.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert_gemm_close(out, product_float64(*lhs, *rhs))
    assert calc_diff(out, x.double() @ w.double().T) < 1e-3


# ---------------------------------------------------------------------------------------------
# Contiguous grouped GEMM
# ---------------------------------------------------------------------------------------------


def contiguous_indices(counts: list[int], order: list[int]) -> torch.Tensor:
    """Rows grouped by expert in ``order``, each segment padded to a multiple of 128 with -1."""
    parts = []
    for g in order:
        c = counts[g]
        if c == 0:
            continue
        padded = _cdiv(c, BLOCK) * BLOCK
        parts.append(torch.tensor([g] * c + [-1] * (padded - c), dtype=torch.int32))
    return torch.cat(parts)


@pytest.mark.parametrize(
    "counts, order, n, k",
    [
        ([5, 0, 130], [0, 1, 2], 200, 256),
        ([128, 1, 64, 127], [3, 1, 0, 2], 128, 128),
        ([300], [0], 64, 384),
    ],
    ids=["with_empty_group", "shuffled_order", "single_group"],
)
def test_contiguous_grouped_matches_float64(counts, order, n, k):
    groups = len(counts)
    gen = torch.Generator().manual_seed(sum(counts) + n + k)
    m_indices = contiguous_indices(counts, order)
    m = m_indices.shape[0]
    assert m % hal.get_m_alignment_for_contiguous_layout() == 0
    a, sa = random_lhs(m, k, gen)
    b, sb = random_rhs(n, k, gen, lead=(groups,))
    out = torch.full((m, n), math.nan, dtype=torch.bfloat16)
    with hal.use_backend("reference"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    for g in range(groups):
        rows = (m_indices == g).nonzero().squeeze(1)
        assert rows.numel() == counts[g]
        if rows.numel():
            assert_gemm_close(out[rows], product_float64(a[rows], sa[rows], b[g], sb[g]))


def test_contiguous_grouped_with_column_major_scales():
    gen = torch.Generator().manual_seed(9)
    m_indices = contiguous_indices([3, 200], [1, 0])
    m = m_indices.shape[0]
    a, sa = random_lhs(m, 256, gen)
    b, sb = random_rhs(96, 256, gen, lead=(2,))
    out = torch.empty(m, 96, dtype=torch.bfloat16)
    with hal.use_backend("reference"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, scales_layout(sa, "tma_aligned")), (b, sb), out, m_indices)
    for g in range(2):
        rows = (m_indices == g).nonzero().squeeze(1)
        assert_gemm_close(out[rows], product_float64(a[rows], sa[rows], b[g], sb[g]))


# ---------------------------------------------------------------------------------------------
# Masked grouped GEMM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "masked, m_max, n, k",
    [([0, 64, 17, 1], 64, 200, 256), ([130, 0, 7], 130, 128, 128), ([5, 5], 8, 64, 384)],
    ids=["four_groups", "odd_m_max", "small"],
)
def test_masked_grouped_matches_float64_and_leaves_other_rows(masked, m_max, n, k):
    groups = len(masked)
    gen = torch.Generator().manual_seed(m_max * 13 + n + k)
    a, sa = random_lhs(m_max, k, gen, lead=(groups,))
    b, sb = random_rhs(n, k, gen, lead=(groups,))
    poison = torch.randn(groups, m_max, n, generator=gen).to(torch.bfloat16)
    poison[:, ::3] = math.nan
    out = poison.clone()
    masked_m = torch.tensor(masked, dtype=torch.int32)
    with hal.use_backend("reference"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, expected_m=max(1, max(masked) // 2))
    for g, rows in enumerate(masked):
        # rows at or beyond masked_m[g] are bit-for-bit what they were
        assert torch.equal(out[g, rows:].view(torch.int16), poison[g, rows:].view(torch.int16))
        if rows:
            assert_gemm_close(out[g, :rows], product_float64(a[g, :rows], sa[g, :rows], b[g], sb[g]))


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

M, N, K = 7, 200, 256


def _dense_args() -> dict:
    gen = torch.Generator().manual_seed(1)
    a, sa = random_lhs(M, K, gen)
    b, sb = random_rhs(N, K, gen)
    return {"lhs": (a, sa), "rhs": (b, sb), "out": torch.empty(M, N, dtype=torch.bfloat16)}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous (every other element of a wider last dimension)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    result = wide[..., ::2]
    assert result.shape == t.shape and not result.is_contiguous()
    return result


DENSE_INVALID = [
    ("partial_k_with_floor_scale_columns", lambda d: {"lhs": (d["lhs"][0][:, :200], d["lhs"][1][:, :1]),
                                                      "rhs": (d["rhs"][0][:, :200].contiguous(), d["rhs"][1][:, :1])},
     hal.ShapeError, ValueError, "lhs[1]"),
    ("out_requires_grad", lambda d: {"out": d["out"].clone().requires_grad_()}, hal.ArgumentError, hal.HalError, "out"),
    ("a_bf16", lambda d: {"lhs": (d["lhs"][0].to(torch.bfloat16), d["lhs"][1])}, hal.DTypeError, TypeError, "lhs[0]"),
    ("a_e5m2", lambda d: {"lhs": (d["lhs"][0].to(torch.float8_e5m2), d["lhs"][1])}, hal.DTypeError, TypeError, "lhs[0]"),
    ("b_bf16", lambda d: {"rhs": (d["rhs"][0].to(torch.bfloat16), d["rhs"][1])}, hal.DTypeError, TypeError, "rhs[0]"),
    ("sa_float16", lambda d: {"lhs": (d["lhs"][0], d["lhs"][1].half())}, hal.DTypeError, TypeError, "lhs[1]"),
    ("sb_float16", lambda d: {"rhs": (d["rhs"][0], d["rhs"][1].half())}, hal.DTypeError, TypeError, "rhs[1]"),
    ("out_float32", lambda d: {"out": d["out"].float()}, hal.DTypeError, TypeError, "out"),
    ("sa_shape", lambda d: {"lhs": (d["lhs"][0], torch.ones(M, K // BLOCK + 1))}, hal.ShapeError, ValueError, "lhs[1]"),
    ("sa_rows", lambda d: {"lhs": (d["lhs"][0], torch.ones(M + 1, K // BLOCK))}, hal.ShapeError, ValueError, "lhs[1]"),
    ("sb_shape", lambda d: {"rhs": (d["rhs"][0], torch.ones(_cdiv(N, BLOCK) + 1, K // BLOCK))}, hal.ShapeError, ValueError, "rhs[1]"),
    ("sb_per_row", lambda d: {"rhs": (d["rhs"][0], torch.ones(N, K // BLOCK))}, hal.ShapeError, ValueError, "rhs[1]"),
    ("b_k_mismatch", lambda d: {"rhs": (d["rhs"][0][:, :128].contiguous(), d["rhs"][1][:, :1])}, hal.ShapeError, ValueError, "rhs[0]"),
    ("out_shape", lambda d: {"out": torch.empty(M, N + 1, dtype=torch.bfloat16)}, hal.ShapeError, ValueError, "out"),
    ("a_not_contiguous", lambda d: {"lhs": (_strided(d["lhs"][0]), d["lhs"][1])}, hal.LayoutError, ValueError, "lhs[0]"),
    ("b_not_contiguous", lambda d: {"rhs": (_strided(d["rhs"][0]), d["rhs"][1])}, hal.LayoutError, ValueError, "rhs[0]"),
    ("out_not_contiguous", lambda d: {"out": _strided(d["out"])}, hal.LayoutError, ValueError, "out"),
    ("lhs_not_a_pair", lambda d: {"lhs": d["lhs"][0]}, hal.DTypeError, TypeError, "lhs"),
    ("lhs_triple", lambda d: {"lhs": (*d["lhs"], d["lhs"][1])}, hal.DTypeError, TypeError, "lhs"),
    ("rhs_not_a_pair", lambda d: {"rhs": d["rhs"][0]}, hal.DTypeError, TypeError, "rhs"),
    ("sa_other_device", lambda d: {"lhs": (d["lhs"][0], d["lhs"][1].to("meta"))}, hal.DeviceError, ValueError, "lhs[1]"),
]


def _check_rejection(call, error, builtin, argument, op):
    with hal.use_backend("reference"):
        with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
            call()
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, hal.ArgumentError)
    assert info.value.argument == argument
    assert info.value.op == op


@pytest.mark.parametrize("mutate, error, builtin, argument", [c[1:] for c in DENSE_INVALID], ids=[c[0] for c in DENSE_INVALID])
def test_dense_gemm_rejects(mutate, error, builtin, argument):
    args = _dense_args()
    args.update(mutate(args))
    _check_rejection(lambda: hal.gemm_fp8_fp8_bf16_nt(**args), error, builtin, argument, "gemm_fp8_fp8_bf16_nt")


def test_an_in_place_out_that_is_not_contiguous_is_not_told_to_pass_a_copy():
    args = _dense_args()
    args["out"] = _strided(args["out"])
    with pytest.raises(hal.LayoutError) as info:
        hal.gemm_fp8_fp8_bf16_nt(**args)
    assert "torch.empty" in info.value.fix and "would be a copy" in info.value.fix


@pytest.mark.parametrize("k", [200, 576, 64])
def test_k_not_a_multiple_of_128_with_row_strided_operands_as_deepgemm_tests_cast_them(k):
    """DeepGEMM's own test pads K, casts, and passes the [:, :K] view: row-strided A, ceil(K/128) scales."""
    gen = torch.Generator().manual_seed(k)
    padded_k = _cdiv(k, BLOCK) * BLOCK
    a_full, sa = random_lhs(M, padded_k, gen)
    b_full, sb = random_rhs(N, padded_k, gen)
    a_full[:, k:] = 0
    b_full[:, k:] = 0
    a, b = a_full[:, :k], b_full[:, :k]
    assert not a.is_contiguous() or k == padded_k
    expected = torch.empty(M, N, dtype=torch.bfloat16)
    with hal.use_backend("reference"):
        hal.gemm_fp8_fp8_bf16_nt((a_full, sa), (b_full, sb), expected)
    for backend in ("reference", "opencl"):
        if not hal.get_backend(backend).available:
            continue
        out = torch.empty(M, N, dtype=torch.bfloat16)
        with hal.use_backend(backend):
            hal.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb.clone()), out)
        assert torch.equal(out, expected), backend


def test_dense_args_are_valid():
    args = _dense_args()
    with hal.use_backend("reference"):
        hal.gemm_fp8_fp8_bf16_nt(**args)


G = 3


def _contiguous_args() -> dict:
    gen = torch.Generator().manual_seed(2)
    m_indices = contiguous_indices([100, 0, 128], [0, 1, 2])  # 256 rows
    a, sa = random_lhs(m_indices.shape[0], K, gen)
    b, sb = random_rhs(N, K, gen, lead=(G,))
    return {"lhs": (a, sa), "rhs": (b, sb), "out": torch.empty(m_indices.shape[0], N, dtype=torch.bfloat16), "m_indices": m_indices}


def _set_indices(**rows):
    def mutate(d):
        m_indices = d["m_indices"].clone()
        for row, value in rows.items():
            m_indices[int(row.removeprefix("r"))] = value
        return {"m_indices": m_indices}
    return mutate


def _truncate_m(d, m):
    a, sa = d["lhs"]
    return {"lhs": (a[:m].contiguous(), sa[:m]), "out": d["out"][:m].contiguous(), "m_indices": d["m_indices"][:m].contiguous()}


CONTIGUOUS_INVALID = [
    ("m_indices_equal_G", _set_indices(r3=G), hal.ValueRangeError, ValueError, "m_indices"),
    ("m_indices_below_minus_1", _set_indices(r130=-2), hal.ValueRangeError, ValueError, "m_indices"),
    ("m_indices_int64", lambda d: {"m_indices": d["m_indices"].long()}, hal.DTypeError, TypeError, "m_indices"),
    ("m_indices_length", lambda d: {"m_indices": d["m_indices"][:128].contiguous()}, hal.ShapeError, ValueError, "m_indices"),
    ("m_not_multiple_of_128", lambda d: _truncate_m(d, 200), hal.ShapeError, ValueError, "lhs[0]"),
    ("two_groups_in_one_block", _set_indices(r100=2), hal.ValueRangeError, ValueError, "m_indices"),
    ("two_groups_no_padding", _set_indices(r0=1), hal.ValueRangeError, ValueError, "m_indices"),
    ("padding_before_valid_rows", _set_indices(r128=-1), hal.ValueRangeError, ValueError, "m_indices"),
    ("rhs_not_grouped", lambda d: {"rhs": (d["rhs"][0][0], d["rhs"][1][0])}, hal.ShapeError, ValueError, "rhs[0]"),
    ("sb_groups", lambda d: {"rhs": (d["rhs"][0], d["rhs"][1][:2])}, hal.ShapeError, ValueError, "rhs[1]"),
    ("a_bf16", lambda d: {"lhs": (d["lhs"][0].to(torch.bfloat16), d["lhs"][1])}, hal.DTypeError, TypeError, "lhs[0]"),
    ("lhs_not_a_pair", lambda d: {"lhs": list(d["lhs"]) + [None]}, hal.DTypeError, TypeError, "lhs"),
]


@pytest.mark.parametrize(
    "mutate, error, builtin, argument", [c[1:] for c in CONTIGUOUS_INVALID], ids=[c[0] for c in CONTIGUOUS_INVALID]
)
def test_contiguous_grouped_rejects(mutate, error, builtin, argument):
    args = _contiguous_args()
    args.update(mutate(args))
    _check_rejection(
        lambda: hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(**args), error, builtin, argument,
        "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    )


def test_contiguous_args_are_valid():
    args = _contiguous_args()
    with hal.use_backend("reference"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(**args)


M_MAX = 32


def _masked_args() -> dict:
    gen = torch.Generator().manual_seed(3)
    a, sa = random_lhs(M_MAX, K, gen, lead=(G,))
    b, sb = random_rhs(N, K, gen, lead=(G,))
    return {
        "lhs": (a, sa), "rhs": (b, sb), "out": torch.empty(G, M_MAX, N, dtype=torch.bfloat16),
        "masked_m": torch.tensor([0, M_MAX, 5], dtype=torch.int32), "expected_m": 8,
    }


MASKED_INVALID = [
    ("masked_m_above_m_max", lambda d: {"masked_m": torch.tensor([0, M_MAX + 1, 5], dtype=torch.int32)},
     hal.ValueRangeError, ValueError, "masked_m"),
    ("masked_m_negative", lambda d: {"masked_m": torch.tensor([0, -1, 5], dtype=torch.int32)}, hal.ValueRangeError, ValueError, "masked_m"),
    ("masked_m_int64", lambda d: {"masked_m": d["masked_m"].long()}, hal.DTypeError, TypeError, "masked_m"),
    ("masked_m_length", lambda d: {"masked_m": d["masked_m"][:2]}, hal.ShapeError, ValueError, "masked_m"),
    ("expected_m_zero", lambda d: {"expected_m": 0}, hal.ValueRangeError, ValueError, "expected_m"),
    ("expected_m_float", lambda d: {"expected_m": 8.0}, hal.DTypeError, TypeError, "expected_m"),
    ("a_groups_mismatch", lambda d: {"lhs": (d["lhs"][0][:2].contiguous(), d["lhs"][1][:2])}, hal.ShapeError, ValueError, "lhs[0]"),
    ("a_not_grouped", lambda d: {"lhs": (d["lhs"][0][0], d["lhs"][1][0])}, hal.ShapeError, ValueError, "lhs[0]"),
    ("out_not_grouped", lambda d: {"out": d["out"][0]}, hal.ShapeError, ValueError, "out"),
    ("out_float32", lambda d: {"out": d["out"].float()}, hal.DTypeError, TypeError, "out"),
    ("out_not_contiguous", lambda d: {"out": _strided(d["out"])}, hal.LayoutError, ValueError, "out"),
    ("rhs_not_a_pair", lambda d: {"rhs": None}, hal.DTypeError, TypeError, "rhs"),
]


@pytest.mark.parametrize("mutate, error, builtin, argument", [c[1:] for c in MASKED_INVALID], ids=[c[0] for c in MASKED_INVALID])
def test_masked_grouped_rejects(mutate, error, builtin, argument):
    args = _masked_args()
    args.update(mutate(args))
    _check_rejection(
        lambda: hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(**args), error, builtin, argument, "m_grouped_gemm_fp8_fp8_bf16_nt_masked"
    )


def test_masked_args_are_valid():
    args = _masked_args()
    with hal.use_backend("reference"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(**args)
