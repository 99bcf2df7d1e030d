"""DeepGEMM's current GEMM API (v2, July 2025 on) on the same operators as the v1 names.

``fp8_gemm_{nt,nn,tn,tt}(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None,
compiled_dims=..., disable_ue8m0_cast=False)``: ``d = a @ b.T (+ c)`` where the letters say how
``a`` and ``b`` are given (``n``: K-major as [M, K] / [N, K]; ``t``: transposed, [K, M] / [K, N],
with their scales transposed too), ``d`` is bf16 or float32 and ``c`` (``d``'s shape and dtype,
possibly ``d`` itself) is added in fp32 before the single rounding.

Scales (``a = (values, sfa)``, ``b = (values, sfb)``), one per 128 K-channels:

- sfa: [M, ceil(K/128)], per token (recipe_a (1, 128));
- sfb: [ceil(N/128), ceil(K/128)] per 128x128 block (recipe (1, 128, 128), the default), or
  [N, ceil(K/128)] per token (recipe (1, 1, 128), DeepGEMM's weight-gradient recipe);
- float32 (any values, or UE8M0 powers of two from ``per_token_cast_to_fp8(..., use_ue8m0=True)``),
  or int32 with four UE8M0 exponents packed per int along K (``pack_ue8m0_to_int``), which the
  library unpacks before dispatch (exact). Scales are used as given: ``disable_ue8m0_cast`` is
  accepted for signature compatibility (hal never rounds fp32 scales to powers of two, as
  DeepGEMM's SM90 kernels do not).

Operands given MN-major are made K-major (a copy) before dispatch; ``compiled_dims`` is a JIT hint
and is ignored. ``m_grouped_fp8_gemm_nt_contiguous`` takes ``grouped_layout`` as m_indices [M] or,
with ``use_psum_layout``, as the cumulative row ends [G] of each group (group g's rows are
``[align(end[g - 1], alignment), end[g])``; as DeepGEMM computes whole tiles, rows up to
``align(end[g])`` are computed with group g: zeros where A's padding rows are zero, which
``ensure_zero_padding`` asks for). With m_indices, -1 rows inside a group's aligned block are
computed with that group for the same reason (:func:`hal.ops.gemm.rows_by_block`). Contracts and numerics:
:mod:`hal.ops.gemm`.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from hal import optional
from hal.checks import FP8, SMALL, expect_in_range, expect_int, expect_same_device, expect_tensor, remember, value_checks_enabled, values_within
from hal.dispatch import call
from hal.errors import ArgumentError, DTypeError, OperatorNotSupportedError, ShapeError, ValueRangeError
from hal.layouts import Layouts, int_bucket
from hal.ops import gemm as v1
from hal.ops.fp8_quant import BLOCK

__all__ = [
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "fp8_gemm_nt_skip_head_mid",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "wgrad_gemm_fp8_fp8_fp32_nt", "unpack_ue8m0_scales", "k_grouped_segments",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "get_mk_alignment_for_contiguous_layout", "set_mk_alignment_for_contiguous_layout", "get_theoretical_mk_alignment_for_contiguous_layout",
]

def get_mk_alignment_for_contiguous_layout() -> int:
    """Row (M) or K alignment of each group's segment in the contiguous layouts (default 128)."""
    return v1.get_m_alignment_for_contiguous_layout()


def set_mk_alignment_for_contiguous_layout(value: int) -> None:
    """Set the segment alignment: a positive multiple of 32, as DeepGEMM's kernels accept."""
    value = expect_int("set_mk_alignment_for_contiguous_layout", "value", value, minimum=32)
    if value % 32:
        raise ValueRangeError("set_mk_alignment_for_contiguous_layout", "value", "a multiple of 32", str(value), "Use 32, 64, 128...")
    v1._alignment[0] = value


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """The alignment a kernel needs at least: hal's kernels take any, so the current setting."""
    return get_mk_alignment_for_contiguous_layout()


def unpack_ue8m0_scales(op: str, name: str, sf: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 scales holding four UE8M0 exponents each (lowest byte first) -> float32 powers of two,
    the first ``columns`` along the last dimension. float32 scales pass through.

    A byte is read as a float32's exponent bits (DeepGEMM's ``<< 23``), so 0 is 0.0 and 255 is
    +inf, where the MODEL1 cache's scale bytes read 0 as 2^-127 and 255 as NaN (OCP E8M0). The
    casts never write either byte: their exponents lie in [1, 254]."""
    if sf.dtype == torch.float32:
        return sf
    if sf.dtype != torch.int32:
        raise DTypeError(op, name, "float32 scales, or int32 packed UE8M0 exponents", f"dtype {sf.dtype}", "Pass the scales from per_token_cast_to_fp8.")
    if sf.shape[-1] * 4 < columns:
        raise ShapeError(op, name, f"ceil({columns} / 4) packed columns", f"{sf.shape[-1]}", "Pack ceil(K/128) exponents four per int32.")
    exponents = sf.clone(memory_format=torch.contiguous_format).view(torch.uint8).to(torch.int32)[..., :columns]
    return (exponents << 23).view(torch.float32)


def _pair(op: str, name: str, operand: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(operand, (tuple, list)) and len(operand) == 2):
        raise DTypeError(op, name, "a pair (fp8 tensor, scales)", type(operand).__name__, f"Pass '{name}' as (values, scales).")
    values, scales = operand
    if isinstance(values, torch.Tensor) and values.dtype == torch.int8:
        raise OperatorNotSupportedError(f"{op}: FP4 operands ({name} int8, packed e2m1; DeepGEMM's SM100 path) are not in unihal's GEMM contract; pass FP8.")
    expect_tensor(op, f"{name}[1]", scales, dtypes=(torch.float32, torch.int32))
    return values, scales


def _recipe(op: str, name: str, value: object) -> tuple[object, ...]:
    """A recipe as a tuple to compare: a tuple or list (DeepGEMM's ``std::optional<std::tuple>``
    takes either); anything else is a typed error, not Python's TypeError from ``tuple()``."""
    if not isinstance(value, (tuple, list)):
        raise ArgumentError(op, name, "a tuple of ints, or None", repr(value), "Pass e.g. (1, 128, 128), or leave it out.")
    return tuple(value)


def _check_recipe_a(op: str, recipe_a: object) -> None:
    """The LHS recipe, when given, is DeepGEMM's per-token one: (1, 128)."""
    if recipe_a is not None and _recipe(op, "recipe_a", recipe_a) != (1, 128):
        raise ValueRangeError(op, "recipe_a", "(1, 128)", repr(recipe_a), "The LHS is scaled per token and 128 channels.")


def _recipe_rows(op: str, n: int, sfb_rows: int, recipe: object, recipe_b: object) -> int:
    """1 (per-token RHS scales) or 128 (128x128 blocks): from the recipe when given, else sfb's rows."""
    wanted = None
    if recipe is not None:
        if _recipe(op, "recipe", recipe) not in ((1, 128, 128), (1, 1, 128)):
            raise ValueRangeError(op, "recipe", "(1, 128, 128) or (1, 1, 128)", repr(recipe), "Other granularities are DeepGEMM's FP4 / SM100 recipes.")
        wanted = recipe[1]
    elif recipe_b is not None:
        if _recipe(op, "recipe_b", recipe_b) not in ((128, 128), (1, 128)):
            raise ValueRangeError(op, "recipe_b", "(128, 128) or (1, 128)", repr(recipe_b), "Use 128 channels per scale along K.")
        wanted = recipe_b[0]
    blocks = -(-n // BLOCK)
    if wanted is None:
        wanted = 1 if sfb_rows == n and n != blocks else BLOCK
    expected = n if wanted == 1 else blocks
    if sfb_rows != expected:
        kind = "per token" if wanted == 1 else "per 128x128 block"
        raise ShapeError(op, "b[1]", f"{expected} rows of scales ({kind})", f"{sfb_rows} rows", "Match the scales to the recipe.")
    return wanted


def _k_major(x: torch.Tensor) -> torch.Tensor:
    """FP8 values K-major (stride 1 along K): MN-major operands are copied."""
    return x if x.numel() == 0 or x.stride(-1) == 1 else x.contiguous()


def _output(op: str, d: object, c: object, shape: tuple[int, ...], dtypes: Sequence[torch.dtype]) -> None:
    expect_tensor(op, "d", d, dtypes=tuple(dtypes), shape=shape, dims=tuple("GMN"[3 - len(shape):]))
    v1._check_written(op, "d", d)
    if c is not None:
        expect_tensor(op, "c", c, dtypes=d.dtype, shape=shape, dims=tuple("GMN"[3 - len(shape):]))


def _listed(recipe: object) -> list[int] | None:
    """A recipe as a custom op's ``int[]?`` argument (a tuple or list of ints, or None)."""
    return None if recipe is None else [int(x) for x in recipe]


# (transpose_a, transpose_b) -> DeepGEMM's layout name
LAYOUTS = {(False, False): "nt", (False, True): "nn", (True, True): "tn", (True, False): "tt"}


def _dense(op: str, a: object, b: object, d: torch.Tensor, c: torch.Tensor | None, recipe: object, recipe_a: object, recipe_b: object,
           transpose_a: bool, transpose_b: bool) -> None:
    if torch.compiler.is_compiling():  # one opaque node, given every argument: its run checks them all, as a call does
        (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
        torch.ops.hal.fp8_gemm(av, asf, bv, bsf, d, c, _listed(recipe), _listed(recipe_a), _listed(recipe_b), LAYOUTS[(transpose_a, transpose_b)])
        return
    pairs = type(a) is tuple and type(b) is tuple and len(a) == len(b) == 2
    values = (op, *a, *b, d, c, recipe, recipe_a, recipe_b, transpose_a, transpose_b) if pairs else None
    m, n, k, features = _DENSE_PLANS.recall(values, _dense_plan, op, a, b, d, c, recipe, recipe_a, recipe_b, transpose_a, transpose_b)
    (av, asf), (bv, bsf) = a, b
    if transpose_a:
        av, asf = av.transpose(0, 1), asf.transpose(0, 1)
    if transpose_b:
        bv, bsf = bv.transpose(0, 1), bsf.transpose(0, 1)
    if m == 0 or n == 0:
        return
    if k == 0:  # nothing to multiply: d = c, or zeros
        d.copy_(c) if c is not None else d.zero_()
        return
    kb = -(-k // BLOCK)
    asf = unpack_ue8m0_scales(op, "a[1]", asf, kb)  # values: on every call (float32 scales pass through)
    bsf = unpack_ue8m0_scales(op, "b[1]", bsf, kb)
    target = d
    if "fp32_out" in features:
        target = d if (d.dtype == torch.float32 and c is None) else torch.empty(m, n, dtype=torch.float32, device=d.device)
    call(v1.GEMM_FP8_NT, "a[0]", av.device, features=features,
         a=v1._padded_to_blocks(_k_major(av)), a_scales=asf, b=v1._padded_to_blocks(_k_major(bv)), b_scales=bsf, out=target)
    if c is not None:
        write_sum(d, target, c)


def write_sum(d: torch.Tensor, product: torch.Tensor, c: torch.Tensor) -> None:
    """``d = product + c`` with one rounding: the fp32 sum, then d's dtype (torch adds bf16 or fp32
    ``c`` in fp32 and rounds on the store). In one pass into ``d`` when ``c`` is ``d`` or lies in
    another storage; through a temporary when ``c`` is another view of d's memory (torch detects
    only some overlaps: an expanded or strided ``c`` over d's rows would be read after they were
    written)."""
    if c is d or c.untyped_storage().data_ptr() != d.untyped_storage().data_ptr():
        torch.add(product, c, out=d)
    else:
        d.copy_(product + c.float())


# Argument layouts of the dense GEMMs that passed _dense_plan's checks, with its plan.
_DENSE_PLANS = Layouts()  # argument layouts that passed _dense_plan -> its plan (m, n, k, features)


def _dense_plan(op: str, a: object, b: object, d: torch.Tensor, c: torch.Tensor | None, recipe: object, recipe_a: object, recipe_b: object,
                transpose_a: bool, transpose_b: bool) -> tuple[int, int, int, frozenset[str]]:
    """Every check of a dense GEMM's arguments (all structural: dtypes, shapes, strides, devices,
    recipes); returns (M, N, K, the features the call asks of a backend)."""
    (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
    expect_tensor(op, "a[0]", av, dtypes=FP8, shape=(None, None), dims=("K", "M") if transpose_a else ("M", "K"))
    expect_tensor(op, "b[0]", bv, dtypes=FP8, shape=(None, None), dims=("K", "N") if transpose_b else ("N", "K"))
    if transpose_a:  # the scales are transposed with their values: 2-d first
        expect_tensor(op, "a[1]", asf, shape=(None, None), dims=("ceil(K/128)", "M"))
        av, asf = av.transpose(0, 1), asf.transpose(0, 1)
    if transpose_b:
        expect_tensor(op, "b[1]", bsf, shape=(None, None), dims=("ceil(K/128)", "rows"))
        bv, bsf = bv.transpose(0, 1), bsf.transpose(0, 1)
    m, k = av.shape
    n = bv.shape[0]
    if bv.shape[1] != k:
        raise ShapeError(op, "b[0]", f"K = {k} (a's)", f"K = {bv.shape[1]}", "Give a and b the same K.")
    _check_recipe_a(op, recipe_a)
    kb = -(-k // BLOCK)
    asf = unpack_ue8m0_scales(op, "a[1]", asf, kb)
    bsf = unpack_ue8m0_scales(op, "b[1]", bsf, kb)
    expect_tensor(op, "a[1]", asf, shape=(m, kb), dims=("M", "ceil(K/128)"))
    expect_tensor(op, "b[1]", bsf, shape=(None, kb), dims=("rows", "ceil(K/128)"))
    gran = _recipe_rows(op, n, bsf.shape[0], recipe, recipe_b)
    _output(op, d, c, (m, n), (torch.bfloat16, torch.float32))
    expect_same_device(op, "a[0]", av, **{"a[1]": asf, "b[0]": bv, "b[1]": bsf, "d": d, "c": c})
    features = {"b_per_token"} if gran == 1 and n > 1 else set()
    if c is not None or d.dtype == torch.float32:
        features.add("fp32_out")
    return m, n, k, frozenset(features)


def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b.T (+ c)``: a = (fp8 [M, K], sfa), b = (fp8 [N, K], sfb), d bf16/float32 [M, N] (module docstring)."""
    _dense("fp8_gemm_nt", a, b, d, c, recipe, recipe_a, recipe_b, False, False)


def fp8_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b (+ c)``: b = (fp8 [K, N], sfb [ceil(K/128), ceil(N/128) or N])."""
    _dense("fp8_gemm_nn", a, b, d, c, recipe, recipe_a, recipe_b, False, True)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = a.T @ b (+ c)`` in DeepGEMM's naming: a = (fp8 [K, M], sfa [ceil(K/128), M]), b = (fp8 [K, N], sfb transposed)."""
    _dense("fp8_gemm_tn", a, b, d, c, recipe, recipe_a, recipe_b, True, True)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "mn", disable_ue8m0_cast: bool = False) -> None:
    """``d = a.T @ b.T (+ c)``: a = (fp8 [K, M], sfa [ceil(K/128), M]), b = (fp8 [N, K], sfb)."""
    _dense("fp8_gemm_tt", a, b, d, c, recipe, recipe_a, recipe_b, True, False)


def fp8_gemm_nt_skip_head_mid(a, b, d, head_splits, recipe=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """DeepGEMM's attention-projection GEMM: ``a @ b.T`` into a ``d`` with a gap in each head.

    b's N = heads * (left + right) output columns are, per head, ``left`` columns then ``right``;
    d (bf16/float32 [M, heads * (left + mid + right)], unit column stride) receives each head's
    ``left`` columns, skips ``mid``, then its ``right`` columns; the skipped columns are not written
    (the caller fills them: another projection, or zeros). Numerics and scales are :func:`fp8_gemm_nt`'s."""
    op = "fp8_gemm_nt_skip_head_mid"
    if not (isinstance(head_splits, (tuple, list)) and len(head_splits) == 3 and all(type(v) is int and v >= 0 for v in head_splits)):
        raise ValueRangeError(op, "head_splits", "three non-negative ints (left, mid, right)", repr(head_splits), "Pass (left, mid, right), e.g. (128, 64, 128).")
    left, mid, right = head_splits
    if left + right == 0:
        raise ValueRangeError(op, "head_splits", "left + right > 0", repr(tuple(head_splits)), "Each head keeps some output columns.")
    d = expect_tensor(op, "d", d, dtypes=(torch.bfloat16, torch.float32), shape=(None, None), dims=("M", "N with gaps"))
    b_data = b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b
    n = expect_tensor(op, "b[0]", b_data, dtypes=FP8, shape=(None, None), dims=("N", "K")).shape[0]
    if n % (left + right):
        raise ShapeError(op, "b[0]", f"N a multiple of left + right = {left + right}", f"N={n}", "Pass whole heads.")
    heads = n // (left + right)
    if d.shape[1] != heads * (left + mid + right) or d.stride(1) != 1:
        raise ShapeError(op, "d", f"[M, {heads * (left + mid + right)}] with unit column stride ({heads} heads of {left} + {mid} + {right})",
                         f"{list(d.shape)} with strides {d.stride()}", "Allocate d with each head's gap.")
    packed = torch.empty(d.shape[0], n, dtype=d.dtype, device=d.device)
    fp8_gemm_nt(a, b, packed, recipe=recipe, compiled_dims=compiled_dims, disable_ue8m0_cast=disable_ue8m0_cast)
    if d.shape[0] == 0:
        return
    gapped = d.unflatten(1, (heads, left + mid + right))
    computed = packed.view(d.shape[0], heads, left + right)
    gapped[:, :, :left].copy_(computed[:, :, :left])
    gapped[:, :, left + mid :].copy_(computed[:, :, left:])


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out: torch.Tensor) -> None:
    """DeepGEMM v1's weight-gradient GEMM: ``out += lhs @ rhs.T`` in float32, both sides per token."""
    _dense("wgrad_gemm_fp8_fp8_fp32_nt", lhs, rhs, out, out, (1, 1, 128), None, None, False, False)


def _grouped_rhs(op: str, b: object, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bv, bsf = _pair(op, "b", b)
    expect_tensor(op, "b[0]", bv, dtypes=FP8, shape=(None, None, None), dims=("G", "K", "N") if transpose else ("G", "N", "K"))
    if transpose:
        bv, bsf = bv.transpose(1, 2), bsf.transpose(-1, -2)
    return bv, bsf


def _psum_to_indices(op: str, ends: torch.Tensor, m: int, alignment: int) -> torch.Tensor:
    """Cumulative group ends [G] -> the group each row is computed with [M]: group g's rows are
    [align(end[g-1]), end[g]) and DeepGEMM computes its whole tiles, so it owns the rows up to
    align(end[g]) (its padding rows, zero where A is zero there: what ``ensure_zero_padding``
    asks for); rows past the last aligned end are -1 (left untouched)."""
    groups = ends.shape[0]
    aligned = (ends + alignment - 1) // alignment * alignment
    starts = torch.zeros_like(ends)
    if groups > 1:
        starts[1:] = aligned[:-1]
    rows = torch.arange(m, device=ends.device, dtype=torch.int32)
    owner = torch.searchsorted(aligned.contiguous(), rows, right=True).to(torch.int32)  # first g with align(end[g]) > row
    inside = owner < groups
    owner_start = starts[owner.clamp(max=max(groups - 1, 0)).long()] if groups else rows
    return torch.where(inside & (rows >= owner_start), owner, torch.full_like(owner, -1))


def _grouped(op: str, a: object, b: object, d: torch.Tensor, grouped_layout: torch.Tensor, recipe: object, recipe_a: object,
             recipe_b: object, use_psum_layout: bool, transpose_b: bool) -> None:
    if torch.compiler.is_compiling():  # one opaque node, given every argument: its run checks them all, as a call does
        (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
        torch.ops.hal.m_grouped_fp8_gemm_contiguous(av, asf, bv, bsf, d, grouped_layout, _listed(recipe), _listed(recipe_a), _listed(recipe_b),
                                                    use_psum_layout, transpose_b)
        return
    pairs = type(a) is tuple and type(b) is tuple and len(a) == len(b) == 2
    values = (op, *a, *b, d, grouped_layout, recipe, recipe_a, recipe_b, use_psum_layout, transpose_b) if pairs else None
    m, n, groups, features = _GROUPED_PLANS.recall(values, _grouped_plan, op, a, b, d, grouped_layout, recipe, recipe_a, recipe_b, use_psum_layout, transpose_b)
    (av, asf), (bv, bsf) = a, b
    if transpose_b:
        bv, bsf = bv.transpose(1, 2), bsf.transpose(-1, -2)
    kb = -(-av.shape[1] // BLOCK)
    asf = unpack_ue8m0_scales(op, "a[1]", asf, kb)  # values: on every call (float32 scales pass through)
    bsf = unpack_ue8m0_scales(op, "b[1]", bsf, kb)
    m_indices = grouped_rows(op, grouped_layout, m, groups, use_psum_layout, "a[0]")
    if m == 0 or n == 0:
        return
    call(v1.M_GROUPED_CONTIGUOUS, "a[0]", av.device, features=features,
         a=v1._padded_to_blocks(_k_major(av)), a_scales=asf, b=v1._padded_to_blocks(_k_major(bv)), b_scales=bsf, out=d,
         m_indices=m_indices)


# Argument layouts of the contiguous grouped GEMMs that passed _grouped_plan's checks, with its plan.
_GROUPED_PLANS = Layouts()


def _grouped_plan(op: str, a: object, b: object, d: torch.Tensor, grouped_layout: torch.Tensor, recipe: object, recipe_a: object,
                  recipe_b: object, use_psum_layout: bool, transpose_b: bool) -> tuple[int, int, int, frozenset[str]]:
    """Every structural check of a contiguous grouped GEMM's arguments; returns (M, N, G, the
    features the call asks of a backend)."""
    av, asf = _pair(op, "a", a)
    expect_tensor(op, "a[0]", av, dtypes=FP8, shape=(None, None), dims=("M", "K"))
    bv, bsf = _grouped_rhs(op, b, transpose_b)
    m, k = av.shape
    groups, n = bv.shape[0], bv.shape[1]
    if bv.shape[2] != k:
        raise ShapeError(op, "b[0]", f"K = {k} (a's)", f"K = {bv.shape[2]}", "Give a and b the same K.")
    _check_recipe_a(op, recipe_a)
    kb = -(-k // BLOCK)
    asf = unpack_ue8m0_scales(op, "a[1]", asf, kb)
    bsf = unpack_ue8m0_scales(op, "b[1]", bsf, kb)
    expect_tensor(op, "a[1]", asf, shape=(m, kb), dims=("M", "ceil(K/128)"))
    expect_tensor(op, "b[1]", bsf, shape=(groups, None, kb), dims=("G", "rows", "ceil(K/128)"))
    gran = _recipe_rows(op, n, bsf.shape[1], recipe, recipe_b)
    _output(op, d, None, (m, n), (torch.bfloat16,))
    if use_psum_layout:
        expect_tensor(op, "grouped_layout", grouped_layout, dtypes=torch.int32, shape=(groups,), dims=("G",), contiguous=True)
    else:
        expect_tensor(op, "grouped_layout", grouped_layout, dtypes=torch.int32, shape=(m,), dims=("M",), contiguous=True)
    expect_same_device(op, "a[0]", av, **{"a[1]": asf, "b[0]": bv, "b[1]": bsf, "d": d, "grouped_layout": grouped_layout})
    features = frozenset({"b_per_token"} if gran == 1 and n > 1 else ())
    return m, n, groups, features


def grouped_rows(op: str, grouped_layout: torch.Tensor, m: int, groups: int, use_psum_layout: bool, argument: str) -> torch.Tensor:
    """The group of each of the M rows, as the contiguous grouped GEMMs' backends receive it, from
    ``grouped_layout`` (structure already checked): with ``use_psum_layout`` the cumulative row
    ends [G], checked and expanded to whole aligned blocks; else m_indices [M], checked and mapped
    by :func:`hal.ops.gemm.contiguous_rows`. ``argument``: the operand whose M is checked."""
    if not use_psum_layout:
        return v1.contiguous_rows(op, grouped_layout, groups, argument, "grouped_layout", "b")
    mapping = _psum_rows(grouped_layout, m)
    if mapping is not None:
        return mapping
    if not values_within(grouped_layout, 0, m + 1):
        expect_in_range(op, "grouped_layout", grouped_layout, 0, m + 1, what="cumulative row ends", fix=f"Each end is at most M = {m}.")
    if grouped_layout.shape[0] > 1 and value_checks_enabled(grouped_layout):
        falls = (grouped_layout[1:] < grouped_layout[:-1]).nonzero()
        if falls.numel():  # group g's rows start where g - 1's end: an end before that is no layout
            g = int(falls[0, 0]) + 1
            raise ValueRangeError(
                op, "grouped_layout", "non-decreasing cumulative row ends (each group's end, its rows following the previous group's)",
                f"end {int(grouped_layout[g])} of group {g} after end {int(grouped_layout[g - 1])} of group {g - 1}",
                "Pass the running sum of the groups' row counts, each group starting at the previous end rounded up to the alignment.",
            )
    m_indices = _psum_to_indices(op, grouped_layout, m, get_mk_alignment_for_contiguous_layout())
    if not values_within(m_indices, -1, groups):  # derived rows: whole aligned blocks already, checked as the contract says
        expect_in_range(op, "grouped_layout", m_indices, -1, groups, what=f"group ids (-1 for padding; b has G={groups})", fix="Each row's group must index b.")
    v1._check_contiguous_segments(op, m_indices, argument, "grouped_layout")
    return m_indices


def _psum_rows(ends: torch.Tensor, m: int) -> torch.Tensor | None:
    """:func:`_psum_to_indices` of a valid psum layout read on the host, or None (the torch path
    then checks and names what is wrong): ``ends`` a CPU tensor of at most ``SMALL`` groups,
    non-decreasing within [0, M], M a multiple of the alignment. Group g then owns the rows
    [align(end[g-1]), align(end[g])) and the rows past the last aligned end are -1: whole aligned
    blocks, so the layout is valid by construction. The mapping is kept per layout of at most
    ``v1._MAPPED_BLOCKS`` blocks (a batch's routing repeats, or is padded); 5 us where the torch
    path's searchsorted and checks cost 35."""
    align = get_mk_alignment_for_contiguous_layout()
    if ends.numel() > SMALL or m % align or not optional.host_readable(ends):
        return None
    listed = ends.tolist()
    previous = 0
    for end in listed:
        if end < previous:
            return None
        previous = end
    if previous > m:
        return None
    key = (tuple(listed), m, align) if m // align <= v1._MAPPED_BLOCKS else None
    mapping = _PSUM_MAPPINGS.get(key) if key is not None else None
    if mapping is None:
        bounds = [0] + [-(-end // align) * align for end in listed] + [m]
        counts = torch.tensor([hi - lo for lo, hi in zip(bounds, bounds[1:])], dtype=torch.int64)
        owners = torch.arange(-1, len(listed), dtype=torch.int32).roll(-1)  # 0, 1, ..., G-1, then -1 for the rows past the last end
        mapping = owners.repeat_interleave(counts)
        remember(_PSUM_MAPPINGS, key, mapping, limit=256)  # no key: not kept
    return mapping


# (group ends, M, alignment) -> _psum_rows' mapping (read only)
_PSUM_MAPPINGS: dict[tuple[tuple[int, ...], int, int], torch.Tensor] = {}


def m_grouped_fp8_gemm_nt_contiguous(
    a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
    use_psum_layout: bool = False, ensure_zero_padding: bool = True, expected_m_for_psum_layout: int | None = None,
) -> None:
    """MoE grouped: ``d[r] = a[r] @ b[g(r)].T`` for rows of group g (``grouped_layout``: m_indices [M] or
    the psum ends [G]); b = (fp8 [G, N, K], sfb [G, ceil(N/128) or N, ceil(K/128)]); d bf16 [M, N]."""
    _grouped("m_grouped_fp8_gemm_nt_contiguous", a, b, d, grouped_layout, recipe, recipe_a, recipe_b, use_psum_layout, False)


def m_grouped_fp8_gemm_nn_contiguous(
    a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
    use_psum_layout: bool = False, ensure_zero_padding: bool = True,
) -> None:
    """As :func:`m_grouped_fp8_gemm_nt_contiguous` with b = (fp8 [G, K, N], sfb transposed)."""
    _grouped("m_grouped_fp8_gemm_nn_contiguous", a, b, d, grouped_layout, recipe, recipe_a, recipe_b, use_psum_layout, True)


def m_grouped_fp8_gemm_nt_masked(
    a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
) -> None:
    """MoE masked: ``d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``; a = (fp8 [G, M_max, K], sfa), d bf16 [G, M_max, N]."""
    op = "m_grouped_fp8_gemm_nt_masked"
    pairs = type(a) is tuple and type(b) is tuple and len(a) == len(b) == 2
    # expected_m (a hint that may change every step) is keyed by whether it is an int >= 1
    values = (op, *a, *b, d, masked_m, int_bucket(expected_m, 1), recipe, recipe_a, recipe_b) if pairs else None
    per_token = _MASKED_PLANS.recall(values, _masked_plan, op, a, b, d, masked_m, expected_m, recipe, recipe_b)
    (av, asf), (bv, bsf) = a, b
    kb = -(-av.shape[2] // BLOCK)
    asf, bsf = unpack_ue8m0_scales(op, "a[1]", asf, kb), unpack_ue8m0_scales(op, "b[1]", bsf, kb)  # values: every call
    if not per_token:  # DeepGEMM's first API checks and runs the per-block recipe
        v1.m_grouped_gemm_fp8_fp8_bf16_nt_masked((_k_major(av), asf), (_k_major(bv), bsf), d, masked_m, expected_m)
        return
    m_max = av.shape[1]
    if not values_within(masked_m, 0, m_max + 1):
        expect_in_range(op, "masked_m", masked_m, 0, m_max + 1, what=f"row counts (at most M_max={m_max})", fix="Clamp masked_m to M_max.")
    call(v1.M_GROUPED_MASKED, "a[0]", av.device, features={"b_per_token"},
         a=v1._padded_to_blocks(_k_major(av)), a_scales=asf, b=v1._padded_to_blocks(_k_major(bv)), b_scales=bsf, out=d,
         masked_m=masked_m, expected_m=expected_m)


# Argument layouts of the masked grouped GEMM that passed _masked_plan's checks -> whether B is
# scaled per token (else DeepGEMM's first API, with its own checks, runs the call).
_MASKED_PLANS = Layouts()


def _masked_plan(op: str, a: object, b: object, d: torch.Tensor, masked_m: torch.Tensor, expected_m: object, recipe: object, recipe_b: object) -> bool:
    """The masked grouped GEMM's structural checks; whether B is scaled per token (recipe
    (1, 1, 128)): then every check of that path, else those of the recipe's choice only."""
    av, asf = _pair(op, "a", a)
    bv, bsf = _pair(op, "b", b)
    expect_tensor(op, "a[0]", av, dtypes=FP8, shape=(None, None, None), dims=("G", "M_max", "K"))
    groups, m_max, k = av.shape
    kb = -(-k // BLOCK)
    asf, bsf = unpack_ue8m0_scales(op, "a[1]", asf, kb), unpack_ue8m0_scales(op, "b[1]", bsf, kb)
    expect_tensor(op, "b[0]", bv, dtypes=FP8, shape=(groups, None, k), dims=("G", "N", "K"))
    n = bv.shape[1]
    gran = _recipe_rows(op, n, bsf.shape[-2] if bsf.dim() == 3 else -1, recipe, recipe_b)
    if gran != 1 or n <= 1:
        return False
    expect_tensor(op, "a[1]", asf, shape=(groups, m_max, kb), dims=("G", "M_max", "ceil(K/128)"))
    expect_tensor(op, "b[1]", bsf, shape=(groups, n, kb), dims=("G", "N", "ceil(K/128)"))
    _output(op, d, None, (groups, m_max, n), (torch.bfloat16,))
    expect_tensor(op, "masked_m", masked_m, dtypes=torch.int32, shape=(groups,), dims=("G",))
    expect_int(op, "expected_m", expected_m, minimum=1)
    expect_same_device(op, "a[0]", av, **{"a[1]": asf, "b[0]": bv, "b[1]": bsf, "d": d, "masked_m": masked_m})
    return True


def k_grouped_segments(op: str, ks_cpu: object, grouped_layout: torch.Tensor, total_k: int, use_psum_layout: bool) -> list[tuple[int, int]]:
    """The K rows ``[start, end)`` of each group of a k-grouped GEMM.

    Without the psum layout, groups follow each other: ``ks_cpu`` (a list of ints on the host,
    each a multiple of the alignment) gives their sizes and ``grouped_layout`` int32 [G] holds
    the same sizes on the device. With ``use_psum_layout``, ``grouped_layout`` holds each group's
    end and a group starts at the previous end rounded up to the alignment
    (:func:`get_mk_alignment_for_contiguous_layout`); ``ks_cpu`` may then be None or empty, and
    the ends are read back to the host (one synchronisation).
    """
    align = get_mk_alignment_for_contiguous_layout()
    expect_tensor(op, "grouped_layout", grouped_layout, dtypes=torch.int32, shape=(None,), dims=("G",), contiguous=True)
    if use_psum_layout:
        ends = [int(e) for e in grouped_layout.tolist()]
        segments, previous = [], 0
        for g, end in enumerate(ends):
            start = -(-previous // align) * align
            if end < start or end > total_k:
                raise ValueRangeError(op, "grouped_layout", f"group ends in [aligned previous end, sum_k={total_k}]", f"{end} for group {g}", "Build the ends as DeepGEMM's psum layout.")
            segments.append((start, end))
            previous = end
        return segments
    if not isinstance(ks_cpu, (list, tuple)) or not ks_cpu or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks_cpu):
        raise ArgumentError(op, "ks_cpu", "a non-empty list of ints (each group's K) without the psum layout", repr(ks_cpu), "Pass the group sizes.")
    if len(ks_cpu) != grouped_layout.shape[0]:
        raise ShapeError(op, "grouped_layout", f"{len(ks_cpu)} groups (len(ks_cpu))", f"{grouped_layout.shape[0]}", "Give both the same group count.")
    bad = [k for k in ks_cpu if k < 0 or k % align]
    if bad:
        raise ValueRangeError(op, "ks_cpu", f"multiples of the alignment {align}", f"{bad[0]}", "Pad each group's K (set_mk_alignment_for_contiguous_layout).")
    if sum(ks_cpu) != total_k:
        raise ShapeError(op, "a[0]", f"sum(ks_cpu) = {sum(ks_cpu)} rows of K", f"{total_k}", "Concatenate every group's K rows.")
    if value_checks_enabled(grouped_layout) and optional.host_readable(grouped_layout):  # the device copy must say the same (read where free)
        on_device = grouped_layout.tolist()
        if on_device != list(ks_cpu):
            g = next(i for i, (x, y) in enumerate(zip(on_device, ks_cpu)) if x != y)
            raise ValueRangeError(op, "grouped_layout", f"each group's K as ks_cpu gives it ({ks_cpu[g]} for group {g})", f"{on_device[g]}",
                                  "Fill grouped_layout with the same group sizes as ks_cpu.")
    starts = [sum(ks_cpu[:g]) for g in range(len(ks_cpu))]
    return [(s, s + k) for s, k in zip(starts, ks_cpu)]


def _sf_rows(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each group's rows of compact per-group scales: ceil(k_g / 128) each, groups without K none."""
    rows, at = [], 0
    for start, end in segments:
        count = -(-(end - start) // BLOCK)
        rows.append((at, at + count))
        at += count
    return rows


def k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, recipe=(1, 1, 128), compiled_dims: str = "mn",
                                     use_psum_layout: bool = False) -> None:
    """MoE weight gradients (DeepGEMM's SM100 form): ``d[g] = c[g] + a_g.T @ b_g`` where a = (fp8
    [sum_k, M], sfa [sum_g ceil(k_g/128), M]) and b = (fp8 [sum_k, N], sfb likewise) hold each
    group's K rows (scales per 128 K-rows of each column, per group); d float32 [G, M, N]; c required."""
    op = "k_grouped_fp8_gemm_tn_contiguous"
    if use_psum_layout and torch.compiler.is_compiling():  # the ends are read on the host: one node reads them when the graph runs
        (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
        return torch.ops.hal.k_grouped_fp8_gemm_tn_psum(av, asf, bv, bsf, d, c, grouped_layout, _listed(recipe))
    if _recipe(op, "recipe", recipe) != (1, 1, 128):
        raise ValueRangeError(op, "recipe", "(1, 1, 128)", repr(recipe), "hal scales per 128 channels of K.")
    (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
    expect_tensor(op, "a[0]", av, dtypes=FP8, shape=(None, None), dims=("sum_k", "M"))
    expect_tensor(op, "b[0]", bv, dtypes=FP8, shape=(av.shape[0], None), dims=("sum_k", "N"))
    segments = k_grouped_segments(op, ks_cpu, grouped_layout, av.shape[0], use_psum_layout)
    groups, m, n = len(segments), av.shape[1], bv.shape[1]
    _output(op, d, c, (groups, m, n), (torch.float32,))
    if c is None:
        raise ArgumentError(op, "c", "a float32 [G, M, N] accumulator (DeepGEMM requires it)", "None", "Pass c (it may be d itself).")
    rows = _sf_rows(segments)
    expect_tensor(op, "a[1]", asf, dtypes=torch.float32, shape=(rows[-1][1] if rows else 0, m), dims=("sum_g ceil(k_g/128)", "M"))
    expect_tensor(op, "b[1]", bsf, dtypes=torch.float32, shape=(rows[-1][1] if rows else 0, n), dims=("sum_g ceil(k_g/128)", "N"))
    for g, ((start, end), (r0, r1)) in enumerate(zip(segments, rows)):
        _dense(op, (av[start:end], asf[r0:r1]), (bv[start:end], bsf[r0:r1]), d[g], c[g], (1, 1, 128), None, None, True, True)


def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, recipe=(1, 1, 128), compiled_dims: str = "mn",
                                     use_psum_layout: bool = False) -> None:
    """MoE weight gradients (DeepGEMM's SM90 form): a = (fp8 flat [sum_k * M], sfa [M, sum_g k_g/128]) holds
    each group's [M, k_g] K-major block in turn, b likewise with N; ``d[g] = c[g] + a_g @ b_g.T``."""
    op = "k_grouped_fp8_gemm_nt_contiguous"
    if _recipe(op, "recipe", recipe) != (1, 1, 128):
        raise ValueRangeError(op, "recipe", "(1, 1, 128)", repr(recipe), "The SM90 k-grouped GEMM scales per token.")
    if use_psum_layout:
        raise ValueRangeError(op, "use_psum_layout", "False (DeepGEMM's FP8 NT form has no psum layout)", "True", "Pass ks_cpu.")
    (av, asf), (bv, bsf) = _pair(op, "a", a), _pair(op, "b", b)
    expect_tensor(op, "a[0]", av, dtypes=FP8, shape=(None,), dims=("sum_k * M",))
    expect_tensor(op, "b[0]", bv, dtypes=FP8, shape=(None,), dims=("sum_k * N",))
    expect_tensor(op, "d", d, dtypes=torch.float32, shape=(None, None, None), dims=("G", "M", "N"))
    groups, m, n = d.shape
    total_k = sum(ks_cpu) if isinstance(ks_cpu, (list, tuple)) else -1
    segments = k_grouped_segments(op, ks_cpu, grouped_layout, total_k, False)
    if av.numel() != total_k * m or bv.numel() != total_k * n:
        raise ShapeError(op, "a[0]", f"sum_k * M = {total_k * m} values (b: {total_k * n})", f"{av.numel()} (b: {bv.numel()})", "Flatten each group's [M, k_g] block in turn.")
    _output(op, d, c, (groups, m, n), (torch.float32,))
    if c is None:
        raise ArgumentError(op, "c", "a float32 [G, M, N] accumulator (DeepGEMM requires it)", "None", "Pass c (it may be d itself).")
    for g, ((start, end), (r0, r1)) in enumerate(zip(segments, _sf_rows(segments))):
        _dense(op, (av[start * m : end * m].view(m, end - start), asf[:, r0:r1]), (bv[start * n : end * n].view(n, end - start), bsf[:, r0:r1]),
               d[g], c[g], (1, 1, 128), None, None, False, False)


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes) -> None:
    """DeepGEMM v1's k-grouped weight gradient (``out[g] += lhs_g @ rhs_g.T``): the SM90 form above
    with ``batch_sizes`` (each group's K, a list of ints) and ``out`` accumulated in place."""
    sizes = [int(k) for k in (batch_sizes.tolist() if isinstance(batch_sizes, torch.Tensor) else batch_sizes)]
    layout = torch.tensor(sizes, dtype=torch.int32, device=out.device)
    k_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, sizes, layout, out)
