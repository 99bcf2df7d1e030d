"""FP8 GEMM with DeepGEMM's fine-grained scaling: dense, MoE contiguous, MoE masked, one kernel.

``out[m, n] = sum_kb (A[m, kb] . B[n, kb]) * sa[m, kb] * sb[n // GRAN_N, kb]``: each 128-wide K
block is one ``tl.dot`` whose fp32 partial is promoted with its two scales, as DeepGEMM's kernel
promotes on CUDA cores. GRAN_N is 128 (128x128 RHS blocks) or 1 (per-token RHS scales, the
weight-gradient recipe); the output is bf16 or float32 (rounded once).
Operands arrive as e4m3fn and enter the dot in the target's format (``Tuning``): e4m3fn as
loaded (fp8-typed loads, so the tiles go from shared memory to the MMA with no bitcast in
registers), e4m3fnuz by reinterpreting the codes at half value (compensated in the scales), or
fp16 on GPUs without FP8 dot instructions (every e4m3 value is exact in fp16).

Layouts select the B group of a tile: dense (group 0), contiguous (``m_indices`` of the tile's
first row; DeepGEMM's layout keeps each 128-row block to one group, -1 blocks are skipped),
masked (grid axis 2 is the group, or a persistent grid walking every group's tiles when that grid
would be larger; rows at or beyond ``masked_m[g]`` are neither computed nor stored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import FNUZ_SCALE, e4m3fn_bits_as_fnuz, round_to
from hal.backends.triton.runtime import interpreting, launch_options
from hal.backends.triton.tuning import FP8_E4M3FN, FP8_E4M3FNUZ, GemmConfig, Tuning

__all__ = ["fp8_gemm", "bf16_gemm", "DENSE", "CONTIGUOUS", "MASKED"]

BLOCK_K = 128
GROUP_M = 8  # row tiles per band of the grid's L2-friendly order
DENSE, CONTIGUOUS, MASKED = 0, 1, 2
_FORMATS = {FP8_E4M3FN: 0, FP8_E4M3FNUZ: 1}


@triton.jit
def _as_dot_operand(loaded, FORMAT: tl.constexpr, UPCAST: tl.constexpr):
    """Loaded operands -> what this target's tl.dot takes (see Tuning.fp8_format / fp8_dot): e4m3fn
    values as loaded (typed loads: no register round trip between shared memory and the MMA), or
    uint8 e4m3fn codes reinterpreted as e4m3fnuz."""
    if FORMAT == 1:
        value = e4m3fn_bits_as_fnuz(loaded).to(tl.float8e4b8, bitcast=True)
    else:
        value = loaded
    if UPCAST:
        value = value.to(tl.float16)
    return value


@triton.jit
def _nan_codes(loaded, FORMAT: tl.constexpr):
    """1 where an operand holds one of e4m3fn's NaN codes (0x7f, 0xff), else 0."""
    if FORMAT == 1:
        codes = loaded
    else:
        codes = loaded.to(tl.uint8, bitcast=True)
    return ((codes & 0x7F) == 0x7F).to(tl.int32)


@triton.jit
def _gemm_tile(
    pid_m, pid_n, group,
    a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, group_ptr,
    M, N, K, operand_scale,
    stride_ag, stride_am, stride_sag, stride_sam, stride_sak,
    stride_bg, stride_bn, stride_sbg, stride_sbn, stride_sbk,
    stride_og, stride_om,
    LAYOUT: tl.constexpr, FORMAT: tl.constexpr, UPCAST: tl.constexpr, EXACT_BF16: tl.constexpr, CHECK_NAN: tl.constexpr,
    GRAN_N: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of out (group ``group`` for the masked layout): nothing when the
    layout says the tile holds no rows (a -1 block of m_indices, rows at or past masked_m[g])."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_limit = M
    active = True
    if LAYOUT == 1:
        group = tl.load(group_ptr + pid_m * BLOCK_M)
        active = group >= 0
    if LAYOUT == 2:
        row_limit = tl.load(group_ptr + group)
        active = pid_m * BLOCK_M < row_limit
    if active:
        row_ok = rows < row_limit
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + group.to(tl.int64) * stride_ag * (LAYOUT == 2) + rows[:, None].to(tl.int64) * stride_am
        b_cols = b_ptr + group.to(tl.int64) * stride_bg + cols[None, :].to(tl.int64) * stride_bn
        sa_rows = sa_ptr + group * stride_sag * (LAYOUT == 2) + rows * stride_sam
        sb_cols = sb_ptr + group * stride_sbg + (cols // GRAN_N) * stride_sbn  # one scale per 128x128 block, or per row of B
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        nan_rows = tl.zeros((BLOCK_M,), dtype=tl.int32)
        nan_cols = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for kb in range(0, K // BLOCK_K):
            k0 = kb * BLOCK_K
            # No fill value for the masked lanes: a row of A past M (a column of B past N) only reaches
            # its own output row (column), which is never stored; K is whole blocks (hal.ops pads it).
            a_codes = tl.load(a_rows + (k0 + ks)[None, :], mask=row_ok[:, None])
            b_codes = tl.load(b_cols + (k0 + ks)[:, None], mask=col_ok[None, :])
            if SCALED:
                if CHECK_NAN:
                    # e4m3fn's NaN codes (0x7f, 0xff) must poison their row / column; see fp8_gemm().
                    nan_rows |= tl.max(_nan_codes(a_codes, FORMAT), axis=1)
                    nan_cols |= tl.max(_nan_codes(b_codes, FORMAT), axis=0)
                a = _as_dot_operand(a_codes, FORMAT, UPCAST)
                b = _as_dot_operand(b_codes, FORMAT, UPCAST)
                partial = tl.dot(a, b, out_dtype=tl.float32)
                sa = tl.load(sa_rows + kb * stride_sak, mask=row_ok, other=0.0)
                sb = tl.load(sb_cols + kb * stride_sbk, mask=col_ok, other=0.0) * operand_scale
                acc += partial * (sa[:, None] * sb[None, :])
            else:  # bf16 operands (bf16 GEMMs): one fp32-accumulated dot per K block, no scales
                if UPCAST:
                    a_codes = a_codes.to(tl.float32)
                    b_codes = b_codes.to(tl.float32)
                acc += tl.dot(a_codes, b_codes, out_dtype=tl.float32)
        if CHECK_NAN:
            acc = tl.where((nan_rows[:, None] | nan_cols[None, :]) != 0, float("nan"), acc)
        out = out_ptr + group.to(tl.int64) * stride_og * (LAYOUT == 2) + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out, round_to(acc, out_ptr.dtype.element_ty, EXACT_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, group_ptr,
    M, N, K, operand_scale, num_groups,
    stride_ag, stride_am, stride_sag, stride_sam, stride_sak,
    stride_bg, stride_bn, stride_sbg, stride_sbn, stride_sbk,
    stride_og, stride_om,
    LAYOUT: tl.constexpr, FORMAT: tl.constexpr, UPCAST: tl.constexpr, EXACT_BF16: tl.constexpr, CHECK_NAN: tl.constexpr,
    GRAN_N: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr, GROUP_M: tl.constexpr,
):
    """A grid of tiles (program ids: (row tile, column tile) in bands of GROUP_M row tiles, group);
    or, ``PERSISTENT`` (the masked
    layout), a fixed set of programs each walking tiles ``pid, pid + programs, ...`` over every
    group's M_max rows, so that groups filled far below M_max cost a skipped loop step per empty
    tile instead of a launched block."""
    if PERSISTENT:
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = tl.cdiv(M, BLOCK_M) * tiles_n
        for tile in range(tl.program_id(0), per_group * num_groups, tl.num_programs(0)):
            group = tile // per_group
            within = tile - group * per_group
            _gemm_tile(
                within // tiles_n, within % tiles_n, group, a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, group_ptr, M, N, K, operand_scale,
                stride_ag, stride_am, stride_sag, stride_sam, stride_sak, stride_bg, stride_bn, stride_sbg, stride_sbn, stride_sbk,
                stride_og, stride_om, LAYOUT, FORMAT, UPCAST, EXACT_BF16, CHECK_NAN, GRAN_N, SCALED, BLOCK_M, BLOCK_N, BLOCK_K,
            )
    else:
        # Grid axis 0 holds the (row tile, column tile) pairs in groups of GROUP_M row tiles: the
        # blocks running at once share GROUP_M row panels of A and a few column panels of B, which
        # then come from L2 (row-major order would stream all of B once per row tile).
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        band = pid // (GROUP_M * tiles_n)
        first_m = band * GROUP_M
        band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        within = pid - band * GROUP_M * tiles_n
        _gemm_tile(
            first_m + within % band_rows, within // band_rows, tl.program_id(1), a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, group_ptr, M, N, K, operand_scale,
            stride_ag, stride_am, stride_sag, stride_sam, stride_sak, stride_bg, stride_bn, stride_sbg, stride_sbn, stride_sbk,
            stride_og, stride_om, LAYOUT, FORMAT, UPCAST, EXACT_BF16, CHECK_NAN, GRAN_N, SCALED, BLOCK_M, BLOCK_N, BLOCK_K,
        )


def fp8_gemm(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out: torch.Tensor,
    *,
    tuning: Tuning,
    layout: int = DENSE,
    groups: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> None:
    """Launch the kernel (arguments already validated by ``hal.ops.gemm``).

    Args:
        a: fp8 e4m3fn [M, K] (dense, contiguous) or [G, M, K] (masked); a_scales matching, any strides.
        b: fp8 e4m3fn [N, K] (dense) or [G, N, K]; b_scales [(G,) ceil(N/128), K/128] or per row [(G,) N, K/128].
        out: bf16 or float32 [(G,) M, N], contiguous.
        tuning: the target's tile table, FP8 format and launch options.
        layout: DENSE, CONTIGUOUS (``groups`` = m_indices int32 [M]) or MASKED (``groups`` = masked_m int32 [G]).
        config: overrides the tuning's tile choice.
    """
    fmt = _FORMATS[tuning.fp8_format]
    # Reinterpreted fnuz operands each carry half their value: scale the product back.
    operand_scale = FNUZ_SCALE * FNUZ_SCALE if tuning.fp8_format == FP8_E4M3FNUZ else 1.0
    # e4m3fn targets load the operands as fp8 (typed pointers feed the MMA straight from shared
    # memory); the fnuz reinterpretation works on the codes, loaded as uint8.
    codes = tuning.fp8_format == FP8_E4M3FNUZ
    _launch(
        a.view(torch.uint8) if codes else a, a_scales, b.view(torch.uint8) if codes else b, b_scales, out, groups, layout, tuning, config,
        operand_scale,
        FORMAT=fmt, UPCAST=not tuning.fp8_dot, GRAN_N=1 if b_scales.shape[-2] == b.shape[-2] else 128, SCALED=True,
        # NaN codes reach the dot as NaN on NVIDIA's FP8 MMA and fp16 widening; the interpreter's fp8
        # emulation and the e4m3fn -> e4m3fnuz reinterpretation (no 0x7f NaN in fnuz) lose them.
        CHECK_NAN=interpreting() or tuning.fp8_format == FP8_E4M3FNUZ,
    )


def _launch(
    a: torch.Tensor, a_scales: torch.Tensor | None, b: torch.Tensor, b_scales: torch.Tensor | None, out: torch.Tensor,
    groups: torch.Tensor | None, layout: int, tuning: Tuning, config: GemmConfig | None, operand_scale: float, **flags: object,
) -> None:
    """The kernel over the grid of ``out``'s tiles (one grid column per masked group); scales None for bf16."""
    m, k = a.shape[-2:]
    n = b.shape[-2]
    if m == 0 or n == 0:
        return
    config = config or tuning.gemm(m, n, k)
    num_groups = a.shape[0] if layout == MASKED else 1
    tiles = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), num_groups)
    # The masked layout's real rows are on the device (masked_m): its grid would launch a block per
    # tile of every group's M_max rows, most of them empty in decoding (M_max 2048, ~64 rows: 28,672
    # blocks for 896 with work). A persistent grid of a few blocks per SM walks the tiles instead.
    persistent = layout == MASKED and tiles[0] * tiles[1] * tiles[2] > _persistent_programs(out.device)
    grid = (_persistent_programs(out.device),) if persistent else (tiles[0] * tiles[1], tiles[2])

    def lead(t: torch.Tensor | None) -> int:
        return t.stride(0) if t is not None and t.dim() == 3 else 0  # group stride; 0 when ungrouped

    def strides(t: torch.Tensor | None) -> tuple[int, int]:
        return (t.stride(-2), t.stride(-1)) if t is not None else (0, 0)

    # bf16 tiles take twice an fp8 tile's shared memory: two stages at most.
    stages = config.num_stages if flags["SCALED"] else min(config.num_stages, 2)
    _fp8_gemm_kernel[grid](
        a, a_scales if a_scales is not None else out, b, b_scales if b_scales is not None else out, out, groups if groups is not None else out,
        m, n, k, operand_scale, num_groups,
        lead(a), a.stride(-2), lead(a_scales), *strides(a_scales),
        lead(b), b.stride(-2), lead(b_scales), *strides(b_scales),
        lead(out), out.stride(-2),
        LAYOUT=layout, EXACT_BF16=interpreting(), BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=BLOCK_K, PERSISTENT=persistent, GROUP_M=GROUP_M,
        num_warps=config.num_warps, num_stages=stages, **flags, **launch_options(tuning),
    )


def _persistent_programs(device: torch.device) -> int:
    """Blocks of a persistent launch: 4 per SM (CU) where the device tells its count; in the
    interpreter a small number, so that its tests walk several tiles per program."""
    if device.type == "cuda" and torch.cuda.is_available():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def bf16_gemm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, tuning: Tuning, layout: int = DENSE, groups: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> None:
    """The same kernel on bf16 operands without scales (DeepGEMM's bf16 GEMMs); shapes as :func:`fp8_gemm`.

    K is a multiple of 128 (hal.ops pads with zeros). The interpreter's bf16 ``tl.dot`` is wrong
    (triton 3.9), so there the operands enter the dot as fp32 (bf16 products are exact in fp32).
    """
    _launch(a, None, b, None, out, groups, layout, tuning, config, 1.0, FORMAT=0, UPCAST=interpreting(), GRAN_N=128, SCALED=False, CHECK_NAN=False)
