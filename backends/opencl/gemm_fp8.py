"""FP8 GEMMs with fine-grained scales (DeepGEMM semantics) as OpenCL kernels: dense and MoE grouped.

One tile routine serves the three layouts. A work-group computes a TM x TN tile of ``out``:
for each 128-wide K block it stages KT-wide slices of A (rows, K contiguous) and B (transposed,
N contiguous) in local memory, decoded from e4m3fn to fp32, and accumulates fp32 partial sums;
at the end of the block it promotes them as DeepGEMM does, ``total += partial * sa[m, kb] *
sb[n // GRAN_N, kb]`` (GRAN_N 128 for 128x128 RHS blocks, 1 for per-token RHS scales), and
writes bf16 (round to nearest even) or float32 once (OUT_F32). Each work-item owns RM rows x
16 columns (a ``float16`` vector per row), so the inner loop is one vector load of B and RM
broadcast-multiply-adds.

Which rows a tile computes is a per-row mask in local memory: rows below M (dense), below
``masked_m[g]`` (masked: the others are never written), or of group g (contiguous: the tile
visits each group present among its rows, normally one; -1 padding rows are skipped).

Layouts: a float8_e4m3fn [M, K] or [G, M_max, K]; a_scales float32 (made contiguous); b
float8_e4m3fn [G, N, K]; b_scales float32 [G, ceil(N/GRAN_N), K/128]; out bfloat16 or float32, contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hal.backends.opencl.buffers import bind
from hal.backends.opencl.device import Runtime, runtime
from hal.backends.opencl.numeric import NUMERIC_SOURCE
from hal.backends.opencl.program import Program, build
from hal.ops.fp8_quant import BLOCK

__all__ = ["gemm_fp8_nt", "m_grouped_contiguous", "m_grouped_masked", "gemm_bf16", "Tiles", "choose_tiles"]

GEMM_FP8_SOURCE = NUMERIC_SOURCE + r"""
/* TM x TN tile per work-group, KT-wide K slices (KT divides 128), RM rows x 16 columns per work-item.
   Work-group: (TN / 16, TM / RM) work-items. */
#define WN (TN / 16)
#define WM (TM / RM)
#define THREADS (WN * WM)
#define SB_ROWS(N) (((N) + GRAN_N - 1) / GRAN_N)
/* 16 operand values from element offset i: e4m3 codes, or bf16 (BF16 1: the unscaled bf16 GEMMs) */
#if BF16
#define ELEM 2
#define LOAD16(p, i) bf16x16_to_float(*(__global const ushort16*)((p) + 2 * (i)))
#else
#define ELEM 1
#define LOAD16(p, i) e4m3x16_to_float(*(__global const uchar16*)((p) + (i)))
#endif
#if OUT_F32
typedef float out_t;
#else
typedef ushort out_t;
#endif

/* Stage A[rows m0.., k0..k0+KT) as fp32 As[TM][KT] (zero for rows not kept) and
   B[n0.., k0..k0+KT) transposed as fp32 Bs[KT][TN] (zero past N). Inputs are 64-byte aligned and
   K is a multiple of 128, so every 16-byte slice is a whole uchar16. */
inline void stage(__global const uchar* a, __global const uchar* b, int n0, int N, int K, int k0,
                  __local const int* keep, __local float16* As, __local float16* Bs, int lid) {
    for (int idx = lid; idx < TM * (KT / 16); idx += THREADS) {
        const int r = idx / (KT / 16), c = idx % (KT / 16);
        As[idx] = keep[r] ? LOAD16(a, (long)r * K + k0 + c * 16) : (float16)0.0f;
    }
    __local float* bs = (__local float*)Bs;
    for (int idx = lid; idx < TN * (KT / 16); idx += THREADS) {
        const int n = idx / (KT / 16), c = idx % (KT / 16);
        float lanes[16];
        *(float16*)lanes = n0 + n < N ? LOAD16(b, (long)(n0 + n) * K + k0 + c * 16) : (float16)0.0f;
        for (int i = 0; i < 16; ++i) bs[(c * 16 + i) * TN + n] = lanes[i];
    }
}

/* out[m0 + r, n0 + c] for kept rows r of the tile. a, sa, out point at row m0; b, sb at the group. */
inline void gemm_tile(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                      __global out_t* out, int n0, int N, int K, __local const int* keep, __local float16* As, __local float16* Bs) {
    const int cx = get_local_id(0), ry = get_local_id(1), lid = ry * WN + cx;
    const int col = n0 + cx * 16, kblocks = K / 128;
    __local const float* as = (__local const float*)As + ry * RM * KT;
    float16 total[RM];
    for (int i = 0; i < RM; ++i) total[i] = 0.0f;
    for (int kb = 0; kb < kblocks; ++kb) {
        float16 part[RM];
        for (int i = 0; i < RM; ++i) part[i] = 0.0f;
        for (int k0 = kb * 128; k0 < kb * 128 + 128; k0 += KT) {
            barrier(CLK_LOCAL_MEM_FENCE);   /* the previous slice is consumed */
            stage(a, b, n0, N, K, k0, keep, As, Bs, lid);
            barrier(CLK_LOCAL_MEM_FENCE);
            /* part[] lives across barriers (in memory on CPUs); acc[] stays in registers */
            float16 acc[RM];
            #pragma unroll
            for (int i = 0; i < RM; ++i) acc[i] = 0.0f;
            for (int k = 0; k < KT; ++k) {
                const float16 bv = Bs[k * WN + cx];
                #pragma unroll
                for (int i = 0; i < RM; ++i) acc[i] += as[i * KT + k] * bv;
            }
            #pragma unroll
            for (int i = 0; i < RM; ++i) part[i] += acc[i];
        }
#if GRAN_N == 1
        /* one scale per column of B */
        float sb_lanes[16];
        for (int e = 0; e < 16; ++e) sb_lanes[e] = col + e < N ? sb[(long)(col + e) * kblocks + kb] : 0.0f;
        const float16 sb_col = *(float16*)sb_lanes;
#else
        /* 16 columns never straddle a 128-column scale block: tiles start at multiples of 16 */
        const float sb_col = col < N ? sb[(col / 128) * kblocks + kb] : 0.0f;
#endif
        for (int i = 0; i < RM; ++i) {
            const int r = ry * RM + i;
#if BF16
            if (keep[r]) total[i] += part[i];
#else
            if (keep[r]) {
                /* the contract's promotion: (part * sa) * sb rounded, then added; contracted to an
                   fma, (part * sa) * sb would not overflow to inf where fp32 does */
                #pragma OPENCL FP_CONTRACT OFF
                total[i] += part[i] * sa[(long)r * kblocks + kb] * sb_col;
            }
#endif
        }
    }
    for (int i = 0; i < RM; ++i) {
        const int r = ry * RM + i;
        if (!keep[r] || col >= N) continue;
        __global out_t* dst = out + (long)r * N + col;
#if OUT_F32
        if (col + 16 <= N) {
            vstore16(total[i], 0, dst);
        } else {
            float lanes[16];
            *(float16*)lanes = total[i];
            for (int c = 0; c < N - col; ++c) dst[c] = lanes[c];
        }
#else
        if (col + 16 <= N) {
            vstore16(float16_to_bf16(total[i]), 0, dst);   /* out rows need not be 32-byte aligned */
        } else {
            float lanes[16];
            *(float16*)lanes = total[i];
            for (int c = 0; c < N - col; ++c) dst[c] = float_to_bf16(lanes[c]);
        }
#endif
    }
}

#define TILE_LOCALS __local int keep[TM]; __local float16 As[TM * KT / 16]; __local float16 Bs[KT * TN / 16]
#define TILE_IDS const int lid = get_local_id(1) * WN + get_local_id(0); \
                 const int n0 = get_group_id(0) * TN, m0 = get_group_id(1) * TM

/* Grid: (WN * ceil(N / TN), WM * ceil(M / TM)). */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_dense(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                __global out_t* out, int M, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < M;
    barrier(CLK_LOCAL_MEM_FENCE);
    gemm_tile(a + (long)m0 * K * ELEM, sa + (long)m0 * (K / 128), b, sb, out + (long)m0 * N, n0, N, K, keep, As, Bs);
}

/* Grid: (WN * ceil(N / TN), WM * ceil(M / TM)); TM divides 128, so a tile lies in one 128-row segment. */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_grouped_contiguous(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                             __global out_t* out, __global const int* m_indices, int M, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    /* Every work-item scans the same rows, so the group loop below is uniform across the work-group. */
    int first = INT_MAX, last = -1;
    for (int r = m0; r < min(m0 + TM, M); ++r) {
        const int g = m_indices[r];
        if (g >= 0) { first = min(first, g); last = max(last, g); }
    }
    const long b_group = (long)N * K * ELEM, sb_group = (long)SB_ROWS(N) * (K / 128);
    for (int g = first; g <= last; ++g) {
        barrier(CLK_LOCAL_MEM_FENCE);   /* the previous group's tile no longer reads keep */
        for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < M && m_indices[m0 + r] == g;
        barrier(CLK_LOCAL_MEM_FENCE);
        gemm_tile(a + (long)m0 * K * ELEM, sa + (long)m0 * (K / 128), b + g * b_group, sb + g * sb_group, out + (long)m0 * N,
                  n0, N, K, keep, As, Bs);
    }
}

/* Grid: (WN * ceil(N / TN), WM * ceil(M_max / TM), G); tiles wholly past masked_m[g] return at once. */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_grouped_masked(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                         __global out_t* out, __global const int* masked_m, int M_max, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    const int g = get_group_id(2), rows = masked_m[g];
    if (m0 >= rows) return;   /* uniform: the whole work-group leaves before any barrier */
    for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < rows;
    barrier(CLK_LOCAL_MEM_FENCE);
    const long row0 = (long)g * M_max + m0;
    gemm_tile(a + row0 * K * ELEM, sa + row0 * (K / 128), b + (long)g * N * K * ELEM, sb + (long)g * SB_ROWS(N) * (K / 128),
              out + row0 * N, n0, N, K, keep, As, Bs);
}
"""


@dataclass(frozen=True)
class Tiles:
    """Tile shape: TM x TN outputs per work-group, KT-wide K slices, RM rows per work-item."""

    tm: int
    tn: int
    kt: int
    rm: int

    def fits(self, rt: Runtime) -> bool:
        threads = (self.tn // 16) * (self.tm // self.rm)
        local_bytes = 4 * (self.tm + self.tm * self.kt + self.kt * self.tn)
        return threads <= rt.max_work_group_size and local_bytes <= rt.local_mem_size


def choose_tiles(rt: Runtime, rows: int) -> Tiles:
    """The largest tile the device holds, its rows cut to the rows there are (decode batches are small).

    CPUs run a work-group per core with no parallelism inside it beyond SIMD, so few work-items
    with many rows each amortise the per-group staging; GPUs want 64+ work-items per group.
    """
    tm = 8
    while tm < min(rows, 64):
        tm *= 2
    candidates = [Tiles(tm, 64, 128, min(tm, 8)), Tiles(tm, 64, 64, min(tm, 8))] if rt.is_cpu else [Tiles(tm, 64, 32, 1), Tiles(tm, 32, 32, 1)]
    candidates.append(Tiles(8, 16, 16, 8))
    return next(t for t in candidates if t.fits(rt))


def _program(rt: Runtime, tiles: Tiles, b_scales: torch.Tensor | None, n: int, out: torch.Tensor) -> Program:
    """The program for these tiles, the RHS scale granularity (per row when b_scales has N rows;
    None: the unscaled bf16 GEMM) and out's dtype."""
    bf16 = b_scales is None
    defines = {"TM": tiles.tm, "TN": tiles.tn, "KT": tiles.kt, "RM": tiles.rm, "BF16": int(bf16),
               "GRAN_N": BLOCK if bf16 or b_scales.shape[-2] != n else 1, "OUT_F32": int(out.dtype == torch.float32)}
    return build(rt, "gemm_fp8", GEMM_FP8_SOURCE, defines)


def _grid(tiles: Tiles, rows: int, n: int, groups: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    local = (tiles.tn // 16, tiles.tm // tiles.rm, 1)
    return (local[0] * -(-n // tiles.tn), local[1] * -(-rows // tiles.tm), groups), local


def gemm_fp8_nt(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: out [M, N] (bf16 or float32) = (a * a_scales) @ (b * b_scales).T with per-128-K-block promotion."""
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0:
        return
    rt = runtime()
    tiles = choose_tiles(rt, m)
    program = _program(rt, tiles, b_scales, n, out)
    with bind(rt, "gemm_fp8.gemm_dense") as io:
        program.launch(
            "gemm_dense", *_grid(tiles, m, n),
            io.input(a), io.input(a_scales), io.input(b), io.input(b_scales), io.output(out), np.int32(m), np.int32(n), np.int32(k),
        )


def m_grouped_contiguous(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor
) -> None:
    """Contiguous grouped: row r uses group m_indices[r]; rows marked -1 are not written."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    rt = runtime()
    tiles = choose_tiles(rt, BLOCK)  # the tile visits every group among its rows: any segment alignment works
    program = _program(rt, tiles, b_scales, n, out)
    with bind(rt, "gemm_fp8.gemm_grouped_contiguous") as io:
        program.launch(
            "gemm_grouped_contiguous", *_grid(tiles, m, n),
            io.input(a), io.input(a_scales), io.input(b), io.input(b_scales), io.output(out), io.input(m_indices),
            np.int32(m), np.int32(n), np.int32(k),
        )


def m_grouped_masked(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int
) -> None:
    """Masked grouped: the first masked_m[g] rows of each group; the other rows are left untouched.

    ``expected_m`` sizes the row tile (most groups hold about that many rows).
    """
    groups, m_max, k = a.shape
    n = b.shape[1]
    if groups == 0 or m_max == 0 or n == 0:
        return
    rt = runtime()
    tiles = choose_tiles(rt, min(expected_m, m_max))
    program = _program(rt, tiles, b_scales, n, out)
    with bind(rt, "gemm_fp8.gemm_grouped_masked") as io:
        program.launch(
            "gemm_grouped_masked", *_grid(tiles, m_max, n, groups),
            io.input(a), io.input(a_scales), io.input(b), io.input(b_scales), io.output(out), io.input(masked_m),
            np.int32(m_max), np.int32(n), np.int32(k),
        )


def gemm_bf16(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, layout: str, groups: torch.Tensor | None = None, expected_m: int = 0) -> None:
    """The bf16 GEMMs on the same tiles (operands decoded from bf16, no scales): ``layout`` is
    "dense" (a [M, K], b [N, K]), "contiguous" (b [G, N, K], groups = m_indices) or "masked"
    (a [G, M_max, K], groups = masked_m). K is a multiple of 128."""
    k = a.shape[-1]
    n = b.shape[-2]
    rows = a.shape[-2]
    if rows == 0 or n == 0 or (layout == "masked" and a.shape[0] == 0):
        return
    rt = runtime()
    tiles = choose_tiles(rt, {"dense": rows, "contiguous": BLOCK, "masked": min(max(expected_m, 1), rows)}[layout])
    program = _program(rt, tiles, None, n, out)
    kernel = {"dense": "gemm_dense", "contiguous": "gemm_grouped_contiguous", "masked": "gemm_grouped_masked"}[layout]
    with bind(rt, f"gemm_bf16.{kernel}") as io:
        unused = io.scratch(4)  # the scale arguments: never read by the unscaled kernels
        args = [io.input(a), unused, io.input(b), unused, io.output(out)]
        if layout == "dense":
            program.launch(kernel, *_grid(tiles, rows, n), *args, np.int32(rows), np.int32(n), np.int32(k))
        else:
            grid = _grid(tiles, rows, n, a.shape[0] if layout == "masked" else 1)
            program.launch(kernel, *grid, *args, io.input(groups), np.int32(rows), np.int32(n), np.int32(k))
