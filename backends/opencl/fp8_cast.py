"""FP8 casts with fine-grained scales as OpenCL kernels: per token x 128 channels, per 128x128 block.

Numerics are those of :mod:`hal.ops.fp8_quant`, bit for bit: amax over the slice in fp32
(NaN propagates, as torch's amax), clamped below at 1e-4; scale = amax / 448; factor =
``448.0 / amax`` as torch evaluates a Python float over a tensor: ``(1 / amax) * 448``, two
roundings (a single division differs in the last bit for some amax, and flips ties of the
codes); codes = e4m3fn(x * factor), one fp32 product each. Divisions are correctly rounded: the
program is built with ``-cl-fp32-correctly-rounded-divide-sqrt`` where the device offers it
(elsewhere OpenCL allows 2.5 ulp).

Layouts: x [rows, K] bf16/fp16/fp32 (made contiguous); values float8_e4m3fn [rows, K]
contiguous; scales float32 [rows, K / 128] per token, [ceil(N/128), ceil(K/128)] per block.
"""

from __future__ import annotations

import numpy as np
import torch

from hal.backends.opencl.buffers import bind
from hal.backends.opencl.device import Runtime, runtime
from hal.backends.opencl.numeric import NUMERIC_SOURCE
from hal.backends.opencl.program import Program, build
from hal.ops.fp8_quant import BLOCK

__all__ = ["per_token_cast", "per_block_cast"]

_X_TYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

FP8_CAST_SOURCE = NUMERIC_SOURCE + r"""
/* X_TYPE: 0 bf16, 1 fp16, 2 fp32 (raw bits for the 16-bit types). LOCAL: work-items per block. */
#if X_TYPE == 0
typedef ushort x_t;
#define X_LOAD(p, i) bf16_to_float((p)[i])
#define X_LOAD16(p) bf16x16_to_float(*(__global const ushort16*)(p))
#elif X_TYPE == 1
typedef ushort x_t;
#define X_LOAD(p, i) fp16_to_float((p)[i])
#define X_LOAD16(p) fp16x16_to_float(*(__global const ushort16*)(p))
#else
typedef float x_t;
#define X_LOAD(p, i) ((p)[i])
#define X_LOAD16(p) (*(__global const float16*)(p))
#endif

#define FP8_MAX 448.0f
#define AMAX_FLOOR 1e-4f
/* torch evaluates `448.0 / amax` (a Python float over a tensor) as reciprocal(amax) * 448 */
#define FP8_FACTOR(amax) ((1.0f / (amax)) * FP8_MAX)

/* amax of |x| by the bits: for non-negative floats the integer order is the float order, and NaN
   (above +inf) wins, so NaN propagates as in torch's amax */
inline uint amax_bits(uint m, float v) { uint a = as_uint(v) & 0x7FFFFFFFu; return a > m ? a : m; }

inline float clamp_amax(uint bits) { float amax = as_float(bits); return amax < AMAX_FLOOR ? AMAX_FLOOR : amax; }

/* One work-item per (token, 128-channel slice), 16 channels at a time: rows are 128-aligned.
   Grid: (K / 128, rows) padded to the work-group. */
__kernel void per_token_cast(__global const x_t* x, __global uchar16* values, __global float* scales, int rows, int cols) {
    const int slice = get_global_id(0), row = get_global_id(1);
    const int slices = cols / 128;
    if (slice >= slices || row >= rows) return;
    __global const x_t* src = x + (long)row * cols + slice * 128;
    uint16 bits = 0;
    for (int v = 0; v < 8; ++v) {
        const uint16 a = as_uint16(X_LOAD16(src + v * 16)) & 0x7FFFFFFFu;
        bits = a > bits ? a : bits;
    }
    const uint8 b8 = bits.lo > bits.hi ? bits.lo : bits.hi;
    const uint4 b4 = b8.lo > b8.hi ? b8.lo : b8.hi;
    const uint2 b2 = b4.lo > b4.hi ? b4.lo : b4.hi;
    const float amax = clamp_amax(b2.x > b2.y ? b2.x : b2.y);
    const float factor = FP8_FACTOR(amax);
    __global uchar16* dst = values + ((long)row * cols + slice * 128) / 16;
    for (int v = 0; v < 8; ++v) dst[v] = float16_to_e4m3(X_LOAD16(src + v * 16) * factor);
    scales[(long)row * slices + slice] = amax / FP8_MAX;
}

/* One work-group of LOCAL (a power of two, at most 128) work-items per 128x128 block: work-items
   take columns, so neighbours read neighbouring addresses; the block's amax is reduced in local
   memory. Rows need not be 16-aligned here (any K). Grid: (ceil(K/128) * LOCAL, ceil(N/128)). */
__kernel __attribute__((reqd_work_group_size(LOCAL, 1, 1)))
void per_block_cast(__global const x_t* x, __global uchar* values, __global float* scales, int rows, int cols) {
    __local uint partial[LOCAL];
    const int lid = get_local_id(0);
    const int col_block = get_group_id(0), row_block = get_group_id(1);
    const int col0 = col_block * 128, row0 = row_block * 128;
    const int width = min(128, cols - col0), height = min(128, rows - row0);
    __global const x_t* src = x + (long)row0 * cols + col0;
    uint bits = 0;
    for (int c = lid; c < width; c += LOCAL)
        for (int r = 0; r < height; ++r) bits = amax_bits(bits, X_LOAD(src, (long)r * cols + c));
    partial[lid] = bits;
    for (int stride = LOCAL / 2; stride > 0; stride /= 2) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < stride && partial[lid + stride] > partial[lid]) partial[lid] = partial[lid + stride];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float amax = clamp_amax(partial[0]);
    const float factor = FP8_FACTOR(amax);
    __global uchar* dst = values + (long)row0 * cols + col0;
    for (int c = lid; c < width; c += LOCAL)
        for (int r = 0; r < height; ++r) dst[(long)r * cols + c] = float_to_e4m3(X_LOAD(src, (long)r * cols + c) * factor);
    if (lid == 0) scales[row_block * ((cols + 127) / 128) + col_block] = amax / FP8_MAX;
}
"""


def _program(rt: Runtime, dtype: torch.dtype) -> tuple[Program, int]:
    """The cast program for ``dtype`` and its block work-group size (a power of two the device allows)."""
    local = 1
    while local * 2 <= min(rt.max_work_group_size, BLOCK):
        local *= 2
    options = ["-cl-fp32-correctly-rounded-divide-sqrt"] if rt.correctly_rounded_divide else []
    return build(rt, "fp8_cast", FP8_CAST_SOURCE, {"X_TYPE": _X_TYPES[dtype], "LOCAL": local}, options), local


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def per_token_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (float8_e4m3fn [M, K], float32 [M, K // 128])."""
    rows, cols = x.shape
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(rows, cols // BLOCK, dtype=torch.float32)
    if values.numel() == 0:
        return values, scales
    rt = runtime()
    program, _ = _program(rt, x.dtype)
    # Work-groups of one slice x up to 64 tokens: a CPU core streams whole rows, a GPU gets enough lanes.
    local_rows = min(64, rt.max_work_group_size, rows)
    with bind(rt, "fp8_cast.per_token_cast") as io:
        program.launch(
            "per_token_cast", (cols // BLOCK, _cdiv(rows, local_rows) * local_rows), (1, local_rows),
            io.input(x), io.output(values), io.output(scales), np.int32(rows), np.int32(cols),
        )
    return values, scales


def per_block_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8_e4m3fn [N, K], float32 [ceil(N/128), ceil(K/128)])."""
    rows, cols = x.shape
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(_cdiv(rows, BLOCK), _cdiv(cols, BLOCK), dtype=torch.float32)
    if values.numel() == 0:
        return values, scales
    rt = runtime()
    program, local = _program(rt, x.dtype)
    with bind(rt, "fp8_cast.per_block_cast") as io:
        program.launch(
            "per_block_cast", (_cdiv(cols, BLOCK) * local, _cdiv(rows, BLOCK)), (local, 1),
            io.input(x), io.output(values), io.output(scales), np.int32(rows), np.int32(cols),
        )
    return values, scales
