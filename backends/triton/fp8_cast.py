"""FP8 casts with DeepGEMM's fine-grained scales: per token x 128 channels, per 128x128 block.

Numerics of :mod:`hal.ops.fp8_quant`: amax clamped at 1e-4, scale = amax / 448, values times
``(1 / amax) * 448`` (how torch evaluates ``448.0 / amax``), rounded with the bit-exact encoder.
Divisions use ``div_rn`` because the GPU's default fp32 division is not correctly rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.backends.triton.conversions import encode_e4m3fn

__all__ = ["per_token_cast", "per_block_cast"]

BLOCK = 128


@triton.jit
def _nan_propagating_amax(x):
    """max |x| over the tile, NaN when any element is NaN (tl.max, like the GPU's fmax, skips NaN)."""
    amax = tl.max(tl.abs(tl.reshape(x, (x.numel,))), axis=0)
    has_nan = tl.max(tl.reshape((x != x).to(tl.int32), (x.numel,)), axis=0)
    return tl.where(has_nan != 0, float("nan"), amax)


@triton.jit
def _scale_and_encode(x, amax):
    amax = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL)
    factor = tl.math.div_rn(1.0, amax) * 448.0
    return encode_e4m3fn(x * factor), tl.math.div_rn(amax, 448.0)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, stride_sm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    kb = tl.program_id(1)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_xm + cols).to(tl.float32)
    codes, scale = _scale_and_encode(x, _nan_propagating_amax(x))
    tl.store(q_ptr + row * stride_qm + cols, codes)
    tl.store(s_ptr + row * stride_sm + kb, scale)


@triton.jit
def _per_block_kernel(x_ptr, q_ptr, s_ptr, N, K, stride_xn, stride_qn, stride_sn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    codes, scale = _scale_and_encode(x, _nan_propagating_amax(x))
    tl.store(q_ptr + rows[:, None] * stride_qn + cols[None, :], codes, mask=mask)
    tl.store(s_ptr + nb * stride_sn + kb, scale)


def per_token_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] contiguous, K % 128 == 0 -> (float8_e4m3fn [M, K], float32 [M, K // 128])."""
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m, k // BLOCK, dtype=torch.float32, device=x.device)
    if m:
        _per_token_kernel[(m, k // BLOCK)](x, codes, scales, x.stride(0), codes.stride(0), scales.stride(0), BLOCK_K=BLOCK)
    return codes.view(torch.float8_e4m3fn), scales


def per_block_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8_e4m3fn [N, K], float32 [ceil(N/128), ceil(K/128)])."""
    x = x.contiguous()
    n, k = x.shape
    grid = (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    codes = torch.empty(n, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*grid, dtype=torch.float32, device=x.device)
    if n and k:
        _per_block_kernel[grid](x, codes, scales, n, k, x.stride(0), codes.stride(0), scales.stride(0), BLOCK_N=BLOCK, BLOCK_K=BLOCK)
    return codes.view(torch.float8_e4m3fn), scales
