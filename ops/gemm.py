"""FP8 GEMMs with fine-grained scaling (DeepGEMM semantics): dense, MoE contiguous, MoE masked.

Formats (DeepGEMM v1 "NT": both operands K-major):

- LHS ``(A, sa)``: A float8_e4m3fn [M, K] contiguous; sa float32 [M, ceil(K / 128)], one scale per
  token per 128 channels. sa may have any strides, including DeepGEMM's column-major
  TMA-aligned layout from ``get_col_major_tma_aligned_tensor``.
- RHS ``(B, sb)``: B float8_e4m3fn [N, K] contiguous; sb float32 [ceil(N / 128), ceil(K / 128)],
  one scale per 128x128 block.
- ``out`` bfloat16 [M, N] contiguous, written in place:
  ``out = sum_kb (sum_{k in kb} A[m, k] * B[n, k]) * sa[m, kb] * sb[n // 128, kb]`` in fp32, over
  128-wide K blocks kb: each block's partial sum is scaled, as DeepGEMM's kernels promote it.
- Any K: scales then have ceil(K / 128) columns, the last K block being partial (DeepGEMM's own
  test uses K = 576). Backends always receive K padded with zeros to a multiple of 128, which
  adds exact zeros to every sum. A and B must be K-major (stride 1 along K); their rows may be
  strided. Grouped variants add a leading group dimension G to B and sb.

Room for DeepGEMM's later API (v2: ``fp8_gemm_nt`` and nn/tn/tt, bf16 GEMMs, k-grouped weight
gradients, UE8M0 packed scales) is left by declaring each variant as its own operator.
"""

from __future__ import annotations

from typing import Any

import torch

from hal import compiled_checks, optional
from hal.checks import FP8, expect_in_range, expect_int, expect_same_device, expect_tensor, remember, value_checks_enabled, values_within
from hal.dispatch import call
from hal.errors import ArgumentError, DTypeError, LayoutError, ShapeError, ValueRangeError
from hal.layouts import Layouts, int_bucket
from hal.operator import Feature, declare
from hal.ops.fp8_quant import BLOCK

__all__ = [
    "GEMM_FP8_NT",
    "M_GROUPED_CONTIGUOUS",
    "M_GROUPED_MASKED",
    "M_ALIGNMENT_CONTIGUOUS",
    "gemm_fp8_fp8_bf16_nt",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "get_m_alignment_for_contiguous_layout",
]

M_ALIGNMENT_CONTIGUOUS = 128

# Version 2 (DeepGEMM's current API): float32 outputs (accumulation with ``c`` runs through them)
# and per-token RHS scales (the (1, 1, 128) weight-gradient recipe). A backend written for
# version 1 is never handed either.
_V2 = (
    Feature("fp32_out", "float32 out (DeepGEMM v2 d float32; accumulation with c)", since=2),
    Feature("b_per_token", "per-token RHS scales [N, ceil(K/128)] (recipe (1, 1, 128))", since=2),
)
GEMM_FP8_NT = declare(
    "gemm_fp8_nt", "hal_gemm_fp8_nt", "gemm", "FP8 GEMM, per-token LHS and 128x128 RHS scales (fp8_gemm_nt, gemm_fp8_fp8_bf16_nt)",
    version=2, features=_V2,
)
M_GROUPED_CONTIGUOUS = declare(
    "m_grouped_gemm_fp8_nt_contiguous", "hal_m_grouped_gemm_fp8_nt_contiguous", "gemm",
    "MoE grouped FP8 GEMM, rows grouped contiguously by expert (m_indices)", version=2, features=_V2,
)
M_GROUPED_MASKED = declare(
    "m_grouped_gemm_fp8_nt_masked", "hal_m_grouped_gemm_fp8_nt_masked", "gemm",
    "MoE grouped FP8 GEMM, fixed rows per expert with a per-expert count (masked_m)", version=2, features=_V2,
)

Operand = tuple[torch.Tensor, torch.Tensor]


_alignment = [M_ALIGNMENT_CONTIGUOUS]  # DeepGEMM's set_mk_alignment_for_contiguous_layout changes it


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each expert's segment in the contiguous layout (DeepGEMM's default: 128)."""
    return _alignment[0]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _unpack(op: str, name: str, operand: object) -> Operand:
    if not (isinstance(operand, (tuple, list)) and len(operand) == 2):
        raise DTypeError(op, name, "a pair (fp8 tensor, float32 scales)", type(operand).__name__, f"Pass '{name}' as (tensor, scales).")
    return operand[0], operand[1]


def _check_written(op: str, name: str, out: torch.Tensor) -> None:
    """An output written in place must be contiguous and must not require grad."""
    if not out.is_contiguous():
        raise LayoutError(
            op, name, "a contiguous tensor (it is written in place)", f"strides {tuple(out.stride())} for shape {list(out.shape)}",
            f"Allocate '{name}' with torch.empty(...) and pass that; '{name}.contiguous()' would be a copy, and the result would land in it, not in your tensor.",
        )
    if out.requires_grad:
        raise ArgumentError(
            op, name, "a tensor that does not require grad (FP8 GEMMs have no backward)", "a tensor with requires_grad=True",
            f"Pass a tensor made under torch.no_grad(), or '{name}.detach()' if it is a fresh buffer.",
        )


def _k_major(op: str, name: str, tensor: torch.Tensor) -> None:
    """FP8 operands are K-major, as DeepGEMM's TMA loads need: stride 1 along K; rows may be strided."""
    if tensor.numel() and tensor.stride(-1) != 1:
        raise LayoutError(
            op, name, "K-major (stride 1 along K; rows may be strided)", f"strides {tuple(tensor.stride())} for shape {list(tensor.shape)}",
            f"Pass '{name}.contiguous()'.",
        )


def _padded_to_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] as a contiguous [..., ceil(K / 128) * 128] with zeros after K (no copy when
    it is one already). Zero channels add exact zeros to every sum, whatever their block's scale."""
    k = x.shape[-1]
    padded_k = _cdiv(k, BLOCK) * BLOCK
    if padded_k == k:
        return x.contiguous()
    padded = torch.zeros(*x.shape[:-1], padded_k, dtype=x.dtype, device=x.device)
    padded[..., :k] = x
    return padded


def as_they_are(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether operands A and B (K-major) go to a backend as they are, with no copy: K whole
    blocks of 128 and both contiguous. A function of their layout, so callers remember it with the
    layout (the two copies' checks cost about 3 us a call)."""
    return a.shape[-1] % BLOCK == 0 and a.is_contiguous() and b.is_contiguous()


def _check_operands(
    op: str, lhs: object, rhs: object, out: object, *, groups: int | None, lhs_groups: bool, more: tuple[object, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check both operands and the output; ``groups`` is None for the dense GEMM.

    ``lhs_groups`` says whether A carries the group dimension (masked layout) or not (contiguous).
    ``more``: the grouped GEMM's own arguments (``(m_indices,)``, or ``(masked_m, expected_m)``),
    checked here too. Structural checks run once per argument layout (:class:`hal.layouts.Layouts`).
    Returns the operands as backends receive them: A and B contiguous with K padded with zeros to
    a multiple of 128 (DeepGEMM accepts any K; its last K block is then partial).
    """
    pairs = type(lhs) is tuple and type(rhs) is tuple and len(lhs) == len(rhs) == 2
    # expected_m (masked) is a hint that may change every step: keyed by whether it is an int >= 1
    keyed = (more[0], int_bucket(more[1], 1)) if len(more) == 2 else more
    values = (op, groups, lhs_groups, *lhs, *rhs, out, *keyed) if pairs else None
    key, ready = _LAYOUTS.lookup(values)
    if ready is None:
        _check_operand_layouts(op, lhs, rhs, out, groups=groups, lhs_groups=lhs_groups)
        a = lhs[0]
        if len(more) == 1:  # contiguous: m_indices
            expect_tensor(op, "m_indices", more[0], dtypes=torch.int32, shape=(a.shape[0],), dims=("M",))
            expect_same_device(op, "lhs[0]", a, m_indices=more[0])
        elif len(more) == 2:  # masked: masked_m, expected_m
            expect_tensor(op, "masked_m", more[0], dtypes=torch.int32, shape=(a.shape[0],), dims=("G",))
            expect_same_device(op, "lhs[0]", a, masked_m=more[0])
            expect_int(op, "expected_m", more[1], minimum=1)
        ready = as_they_are(lhs[0], rhs[0])
        _LAYOUTS.remember(values, key, ready)
    a, sa = lhs
    b, sb = rhs
    if ready:  # K whole blocks and both contiguous (the layout says so): handed over as they are
        return a, sa, b, sb, out
    return _padded_to_blocks(a), sa, _padded_to_blocks(b), sb, out


# argument layouts that passed _check_operand_layouts -> whether A and B go to backends as they are
_LAYOUTS = Layouts()


def _check_operand_layouts(op: str, lhs: object, rhs: object, out: object, *, groups: int | None, lhs_groups: bool) -> None:
    a, sa = _unpack(op, "lhs", lhs)
    b, sb = _unpack(op, "rhs", rhs)
    g_dims: tuple[int | None, ...] = () if groups is None else (None,)
    g_names: tuple[str, ...] = () if groups is None else ("G",)
    a_lead = g_dims if lhs_groups else ()
    a_names = g_names if lhs_groups else ()
    expect_tensor(op, "lhs[0]", a, dtypes=FP8, shape=a_lead + (None, None), dims=a_names + ("M", "K"))
    _k_major(op, "lhs[0]", a)
    m, k = a.shape[-2:]
    expect_tensor(op, "rhs[0]", b, dtypes=FP8, shape=g_dims + (None, k), dims=g_names + ("N", "K"))
    _k_major(op, "rhs[0]", b)
    n = b.shape[-2]
    num_groups = b.shape[0] if groups is not None else None
    lead = (num_groups,) if groups is not None else ()
    if lhs_groups:  # the group count is A's before it is its scales'
        expect_tensor(op, "lhs[0]", a, shape=lead + (m, k), dims=g_names + ("M", "K"))
    k_blocks = _cdiv(k, BLOCK)
    expect_tensor(op, "lhs[1]", sa, dtypes=torch.float32, shape=(lead if lhs_groups else ()) + (m, k_blocks), dims=a_names + ("M", "ceil(K/128)"))
    expect_tensor(op, "rhs[1]", sb, dtypes=torch.float32, shape=lead + (_cdiv(n, BLOCK), k_blocks), dims=g_names + ("ceil(N/128)", "ceil(K/128)"))
    out_shape = (lead if lhs_groups else ()) + (m, n)
    expect_tensor(op, "out", out, dtypes=torch.bfloat16, shape=out_shape, dims=a_names + ("M", "N"))
    _check_written(op, "out", out)
    expect_same_device(op, "lhs[0]", a, **{"lhs[1]": sa, "rhs[0]": b, "rhs[1]": sb, "out": out})


def _check_contiguous_segments(op: str, m_indices: torch.Tensor, argument: str = "lhs[0]", name: str = "m_indices") -> None:
    """DeepGEMM's layout: M a multiple of the alignment (128 by default) and each aligned block of
    rows one group's rows, then padding. ``argument``: the operand whose M is checked; ``name``:
    the argument the row groups came from (``grouped_layout`` in DeepGEMM's current API)."""
    m = m_indices.shape[0]
    align = get_m_alignment_for_contiguous_layout()
    if m % align:
        raise ShapeError(
            op, argument, f"M a multiple of {align} (get_m_alignment_for_contiguous_layout())", f"M={m}",
            f"Pad each expert's rows to a multiple of {align} and mark the padding rows -1 in m_indices.",
        )
    if not value_checks_enabled(m_indices) or m == 0:
        return
    # Within a block each row's index equals the previous row's or is -1: the block is then one
    # group's rows followed only by padding. Pairs that straddle two blocks are exempt. NumPy for
    # CPU tensors (when installed, _first_break); torch's form of the same rule otherwise.
    np = optional.numpy_for(m_indices)
    if np is not None:
        first = _first_break(np, m_indices.numpy(), align)
    else:
        broken = (m_indices[1:] != m_indices[:-1]) & (m_indices[1:] != -1)
        broken[align - 1 :: align] = False
        first = int(broken.nonzero()[0]) if bool(broken.any()) else None
    if first is not None:
        block = (first + 1) // align
        span = f"rows {block * align}..{(block + 1) * align - 1}"
        raise ValueRangeError(
            op, name, f"each {align}-row block to hold one group's rows followed only by -1 padding",
            f"{span} holding {sorted(set(m_indices[block * align : (block + 1) * align].tolist()))}",
            f"Sort rows by expert and pad each expert's segment to a multiple of {align} rows with -1.",
        )


def contiguous_rows(
    op: str, m_indices: torch.Tensor, groups: int, argument: str = "lhs[0]", name: str = "m_indices", operand: str = "rhs"
) -> torch.Tensor:
    """Check the contiguous layout's row groups and return :func:`rows_by_block`'s mapping.

    ``m_indices`` int32 [M] (structure checked by the caller): M a multiple of the alignment, ids
    in [-1, G), and each aligned block one group's rows followed only by -1 padding. On CPU
    tensors one pass: the segment test, then the ids of the blocks' first rows only (valid
    segments hold nothing else but -1), then the mapping from those first rows; an error is
    named by the full checks, range first. ``argument``: the operand whose M is checked; ``name``:
    the argument the row groups came from; ``operand``: the one holding the G groups."""
    align = get_m_alignment_for_contiguous_layout()
    checked = m_indices.shape[0] % align == 0 and m_indices.shape[0] and value_checks_enabled(m_indices)
    # the blocks' first ids when the layout is valid: compiled (1.5 us), else NumPy (4 us); False when not
    listed = compiled_checks.contiguous_blocks(m_indices, align, groups) if checked else None
    np = optional.numpy_for(m_indices) if checked and listed is None else None
    if np is not None:
        rows = m_indices.numpy()
        listed = rows[::align].tolist()
        listed = _first_break(np, rows, align) is None and min(listed) >= -1 and max(listed) < groups and listed
    if listed:
        # kept per layout of blocks (a repeated routing, a padded batch); not for prefill-sized M,
        # whose routing is new every call
        key = (tuple(listed), align) if len(listed) <= _MAPPED_BLOCKS else None
        mapping = _MAPPINGS.get(key) if key is not None else None
        if mapping is None:
            mapping = torch.tensor(listed, dtype=m_indices.dtype).repeat_interleave(align)
            remember(_MAPPINGS, key, mapping, limit=256)  # no key: not kept
        return mapping
    # the separate checks (the torch path, value checks off, or a layout to name the error of)
    if not values_within(m_indices, -1, groups):
        expect_in_range(op, name, m_indices, -1, groups, what=f"group ids (-1 for padding; {operand} has G={groups} groups)",
                        fix=f"Each row's group must index a group of {operand}.")
    _check_contiguous_segments(op, m_indices, argument, name)
    return rows_by_block(m_indices)


def _first_break(np: Any, rows: Any, align: int) -> int | None:
    """The first ``i`` whose next row breaks DeepGEMM's contiguous layout in ``rows`` (NumPy int32
    [M]), or None when every ``align``-row block is one id followed only by -1: a row whose id
    differs from the previous row's starts a block or is -1. A layout changes id about twice a
    block, so the few changes are checked one by one (four NumPy calls cost 3 us where this costs
    2); thousands of them (prefill) vectorised."""
    changes = (rows[1:] != rows[:-1]).nonzero()[0]  # row i + 1 differs from row i
    if len(changes) > _CHANGES_ONE_BY_ONE:
        starts = changes + 1
        bad = np.flatnonzero((starts % align != 0) & (rows[starts] != -1))
        return int(changes[bad[0]]) if len(bad) else None
    item = rows.item
    for i in changes.tolist():
        if (i + 1) % align and item(i + 1) != -1:
            return i
    return None


_CHANGES_ONE_BY_ONE = 64


# (blocks' first ids, alignment) -> rows_by_block's mapping (read only), for layouts of at most
# _MAPPED_BLOCKS blocks (32 KiB a mapping at 128-row blocks: 8 MiB for the 256 kept at most)
_MAPPINGS: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
_MAPPED_BLOCKS = 64


def rows_by_block(m_indices: torch.Tensor) -> torch.Tensor:
    """The group each row of the contiguous layout is computed with, as DeepGEMM computes it.

    DeepGEMM's kernels compute whole tiles: every row of an aligned block (of
    :func:`get_m_alignment_for_contiguous_layout` rows) takes the group of the block's first row.
    Rows marked -1 after a group's rows are therefore computed with that group (A's padding rows
    times its B: zeros where A is zero there, which DeepGEMM's tests build and check over the
    whole output), and a block whose first row is -1 is not computed (its rows are left as they
    were). Backends receive this mapping: a row they are handed as -1 is one they leave untouched.

    ``m_indices``: int32 [M], M a multiple of the alignment. Returns int32 [M] on its device.
    """
    align = get_m_alignment_for_contiguous_layout()
    if m_indices.shape[0] == 0:
        return m_indices
    np = optional.numpy_for(m_indices)
    if np is not None:
        return torch.from_numpy(np.repeat(m_indices.numpy()[::align], align))
    return m_indices[::align, None].expand(-1, align).reshape(-1)  # shapes only: no device sync, capturable


def gemm_fp8_fp8_bf16_nt(lhs: Operand, rhs: Operand, out: torch.Tensor) -> None:
    """Dense FP8 GEMM ``out = lhs @ rhs.T`` with fine-grained scales (see the module docstring).

    Args:
        lhs: ``(A float8_e4m3fn [M, K], sa float32 [M, ceil(K / 128)])``.
        rhs: ``(B float8_e4m3fn [N, K], sb float32 [ceil(N / 128), ceil(K / 128)])``.
        out: bfloat16 [M, N], overwritten.
    """
    op = "gemm_fp8_fp8_bf16_nt"
    if torch.compiler.is_compiling():
        return torch.ops.hal.gemm_fp8_nt(lhs[0], lhs[1], rhs[0], rhs[1], out)
    a, sa, b, sb, out = _check_operands(op, lhs, rhs, out, groups=None, lhs_groups=False)
    call(GEMM_FP8_NT, "lhs[0]", a.device, a=a, a_scales=sa, b=b, b_scales=sb, out=out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: Operand, rhs: Operand, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """MoE grouped FP8 GEMM; A's rows are grouped contiguously by expert.

    Args:
        lhs: ``(A float8_e4m3fn [M, K], sa float32 [M, ceil(K / 128)])``; M is a multiple of 128 and
            each expert's segment of rows is padded to a multiple of 128 rows
            (:func:`get_m_alignment_for_contiguous_layout`) with rows marked -1.
        rhs: ``(B float8_e4m3fn [G, N, K], sb float32 [G, ceil(N / 128), ceil(K / 128)])``.
        out: bfloat16 [M, N]; rows marked -1 inside a group's aligned block are computed with
            that group (DeepGEMM computes whole tiles, see :func:`rows_by_block`); blocks whose
            first row is -1 are left untouched.
        m_indices: int32 [M], the expert of each row in [0, G), -1 for padding.
    """
    op = "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"
    if torch.compiler.is_compiling():
        return torch.ops.hal.m_grouped_gemm_fp8_nt_contiguous(lhs[0], lhs[1], rhs[0], rhs[1], out, m_indices)
    a, sa, b, sb, out = _check_operands(op, lhs, rhs, out, groups=1, lhs_groups=False, more=(m_indices,))
    rows = contiguous_rows(op, m_indices, b.shape[0])
    call(M_GROUPED_CONTIGUOUS, "lhs[0]", a.device, a=a, a_scales=sa, b=b, b_scales=sb, out=out, m_indices=rows)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(
    lhs: Operand, rhs: Operand, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int
) -> None:
    """MoE grouped FP8 GEMM over fixed-size per-expert slots, computing the first masked_m[g] rows.

    Args:
        lhs: ``(A float8_e4m3fn [G, M_max, K], sa float32 [G, M_max, ceil(K / 128)])``.
        rhs: ``(B float8_e4m3fn [G, N, K], sb float32 [G, ceil(N / 128), ceil(K / 128)])``.
        out: bfloat16 [G, M_max, N]; rows at or beyond masked_m[g] are left untouched.
        masked_m: int32 [G], rows to compute per group, each in [0, M_max].
        expected_m: hint for tuning (typical masked_m), a positive int.
    """
    op = "m_grouped_gemm_fp8_fp8_bf16_nt_masked"
    if torch.compiler.is_compiling():
        return torch.ops.hal.m_grouped_gemm_fp8_nt_masked(lhs[0], lhs[1], rhs[0], rhs[1], out, masked_m, expected_m)
    a, sa, b, sb, out = _check_operands(op, lhs, rhs, out, groups=1, lhs_groups=True, more=(masked_m, expected_m))
    m_max = a.shape[1]
    if not values_within(masked_m, 0, m_max + 1):
        expect_in_range(
            op, "masked_m", masked_m, 0, m_max + 1, what=f"row counts (at most M_max={m_max}, the rows of each lhs group)",
            fix="Clamp masked_m to the rows each group holds, or allocate a larger M_max.",
        )
    call(
        M_GROUPED_MASKED, "lhs[0]", a.device,
        a=a, a_scales=sa, b=b, b_scales=sb, out=out, masked_m=masked_m, expected_m=expected_m,
    )
