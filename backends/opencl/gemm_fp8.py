"""FP8 GEMMs with fine-grained scales (DeepGEMM semantics) as OpenCL kernels: dense and MoE grouped.

One tile routine serves the three layouts. A work-group computes a TM x TN tile of ``out``:
for each 128-wide K block it stages KT-wide slices of A (rows, K contiguous) and B (transposed,
N contiguous) in local memory, decoded from e4m3fn to fp32, and accumulates fp32 partial sums;
at the end of the block it promotes them as DeepGEMM does, ``total += partial * sa[m, kb] *
sb[n // 128, kb]``, and writes bf16 (round to nearest even) once. Each work-item owns RM rows x
16 columns (a ``float16`` vector per row), so the inner loop is one vector load of B and RM
broadcast-multiply-adds.

Which rows a tile computes is a per-row mask in local memory: rows below M (dense), below
``masked_m[g]`` (masked: the others are never written), or of group g (contiguous: the tile
visits each group present among its rows, normally one; -1 padding rows are skipped).

Layouts: a float8_e4m3fn [M, K] or [G, M_max, K]; a_scales float32 (made contiguous); b
float8_e4m3fn [G, N, K]; b_scales float32 [G, ceil(N/128), K/128]; out bfloat16, contiguous.
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

__all__ = ["gemm_fp8_nt", "m_grouped_contiguous", "m_grouped_masked", "Tiles", "choose_tiles"]

GEMM_FP8_SOURCE = NUMERIC_SOURCE + r"""
/* TM x TN tile per work-group, KT-wide K slices (KT divides 128), RM rows x 16 columns per work-item.
   Work-group: (TN / 16, TM / RM) work-items. */
#define WN (TN / 16)
#define WM (TM / RM)
#define THREADS (WN * WM)

/* Stage A[rows m0.., k0..k0+KT) as fp32 As[TM][KT] (zero for rows not kept) and
   B[n0.., k0..k0+KT) transposed as fp32 Bs[KT][TN] (zero past N). Inputs are 64-byte aligned and
   K is a multiple of 128, so every 16-byte slice is a whole uchar16. */
inline void stage(__global const uchar* a, __global const uchar* b, int n0, int N, int K, int k0,
                  __local const int* keep, __local float16* As, __local float16* Bs, int lid) {
    for (int idx = lid; idx < TM * (KT / 16); idx += THREADS) {
        const int r = idx / (KT / 16), c = idx % (KT / 16);
        As[idx] = keep[r] ? e4m3x16_to_float(*(__global const uchar16*)(a + (long)r * K + k0 + c * 16)) : (float16)0.0f;
    }
    __local float* bs = (__local float*)Bs;
    for (int idx = lid; idx < TN * (KT / 16); idx += THREADS) {
        const int n = idx / (KT / 16), c = idx % (KT / 16);
        float lanes[16];
        *(float16*)lanes = n0 + n < N ? e4m3x16_to_float(*(__global const uchar16*)(b + (long)(n0 + n) * K + k0 + c * 16)) : (float16)0.0f;
        for (int i = 0; i < 16; ++i) bs[(c * 16 + i) * TN + n] = lanes[i];
    }
}

/* out[m0 + r, n0 + c] for kept rows r of the tile. a, sa, out point at row m0; b, sb at the group. */
inline void gemm_tile(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                      __global ushort* out, int n0, int N, int K, __local const int* keep, __local float16* As, __local float16* Bs) {
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
        /* 16 columns never straddle a 128-column scale block: tiles start at multiples of 16 */
        const float sb_col = col < N ? sb[(col / 128) * kblocks + kb] : 0.0f;
        for (int i = 0; i < RM; ++i) {
            const int r = ry * RM + i;
            if (keep[r]) total[i] += part[i] * sa[(long)r * kblocks + kb] * sb_col;
        }
    }
    for (int i = 0; i < RM; ++i) {
        const int r = ry * RM + i;
        if (!keep[r] || col >= N) continue;
        __global ushort* dst = out + (long)r * N + col;
        if (col + 16 <= N) {
            vstore16(float16_to_bf16(total[i]), 0, dst);   /* out rows need not be 32-byte aligned */
        } else {
            float lanes[16];
            *(float16*)lanes = total[i];
            for (int c = 0; c < N - col; ++c) dst[c] = float_to_bf16(lanes[c]);
        }
    }
}

#define TILE_LOCALS __local int keep[TM]; __local float16 As[TM * KT / 16]; __local float16 Bs[KT * TN / 16]
#define TILE_IDS const int lid = get_local_id(1) * WN + get_local_id(0); \
                 const int n0 = get_group_id(0) * TN, m0 = get_group_id(1) * TM

/* Grid: (WN * ceil(N / TN), WM * ceil(M / TM)). */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_dense(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                __global ushort* out, int M, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < M;
    barrier(CLK_LOCAL_MEM_FENCE);
    gemm_tile(a + (long)m0 * K, sa + (long)m0 * (K / 128), b, sb, out + (long)m0 * N, n0, N, K, keep, As, Bs);
}

/* Grid: (WN * ceil(N / TN), WM * ceil(M / TM)); TM divides 128, so a tile lies in one 128-row segment. */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_grouped_contiguous(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                             __global ushort* out, __global const int* m_indices, int M, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    /* Every work-item scans the same rows, so the group loop below is uniform across the work-group. */
    int first = INT_MAX, last = -1;
    for (int r = m0; r < min(m0 + TM, M); ++r) {
        const int g = m_indices[r];
        if (g >= 0) { first = min(first, g); last = max(last, g); }
    }
    const long b_group = (long)N * K, sb_group = (long)((N + 127) / 128) * (K / 128);
    for (int g = first; g <= last; ++g) {
        barrier(CLK_LOCAL_MEM_FENCE);   /* the previous group's tile no longer reads keep */
        for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < M && m_indices[m0 + r] == g;
        barrier(CLK_LOCAL_MEM_FENCE);
        gemm_tile(a + (long)m0 * K, sa + (long)m0 * (K / 128), b + g * b_group, sb + g * sb_group, out + (long)m0 * N,
                  n0, N, K, keep, As, Bs);
    }
}

/* Grid: (WN * ceil(N / TN), WM * ceil(M_max / TM), G); tiles wholly past masked_m[g] return at once. */
__kernel __attribute__((reqd_work_group_size(WN, WM, 1)))
void gemm_grouped_masked(__global const uchar* a, __global const float* sa, __global const uchar* b, __global const float* sb,
                         __global ushort* out, __global const int* masked_m, int M_max, int N, int K) {
    TILE_LOCALS;
    TILE_IDS;
    const int g = get_group_id(2), rows = masked_m[g];
    if (m0 >= rows) return;   /* uniform: the whole work-group leaves before any barrier */
    for (int r = lid; r < TM; r += THREADS) keep[r] = m0 + r < rows;
    barrier(CLK_LOCAL_MEM_FENCE);
    const long row0 = (long)g * M_max + m0;
    gemm_tile(a + row0 * K, sa + row0 * (K / 128), b + (long)g * N * K, sb + (long)g * ((N + 127) / 128) * (K / 128),
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


def _program(rt: Runtime, tiles: Tiles) -> Program:
    return build(rt, "gemm_fp8", GEMM_FP8_SOURCE, {"TM": tiles.tm, "TN": tiles.tn, "KT": tiles.kt, "RM": tiles.rm})


def _grid(tiles: Tiles, rows: int, n: int, groups: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    local = (tiles.tn // 16, tiles.tm // tiles.rm, 1)
    return (local[0] * -(-n // tiles.tn), local[1] * -(-rows // tiles.tm), groups), local


def gemm_fp8_nt(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: out [M, N] bf16 = (a * a_scales) @ (b * b_scales).T with per-128-K-block promotion."""
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0:
        return
    rt = runtime()
    tiles = choose_tiles(rt, m)
    program = _program(rt, tiles)
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
    tiles = choose_tiles(rt, BLOCK)  # segments are 128-row aligned: tiles up to 128 rows never straddle two
    program = _program(rt, tiles)
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
    program = _program(rt, tiles)
    with bind(rt, "gemm_fp8.gemm_grouped_masked") as io:
        program.launch(
            "gemm_grouped_masked", *_grid(tiles, m_max, n, groups),
            io.input(a), io.input(a_scales), io.input(b), io.input(b_scales), io.output(out), io.input(masked_m),
            np.int32(m_max), np.int32(n), np.int32(k),
        )
