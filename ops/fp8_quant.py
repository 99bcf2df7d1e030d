"""FP8 quantisation with DeepGEMM's fine-grained scales: per token x 128 channels, per 128x128 block.

Numerics follow DeepGEMM's test helpers: amax over each slice, clamped below at 1e-4, scale =
amax / 448 (448 is float8_e4m3fn's largest finite value), values multiplied in fp32 by the
factor ``448.0 / amax`` exactly as torch evaluates that expression (DeepGEMM's helper runs the same
expression, so codes agree bit for bit, ties included) and rounded to e4m3fn. Dequantisation is
``fp8.float() * scale`` broadcast over the slice.
"""

from __future__ import annotations

import torch

from hal.checks import FP8, expect_tensor
from hal.dispatch import call
from hal.errors import ShapeError
from hal.operator import declare

__all__ = [
    "BLOCK",
    "FP8_MAX",
    "PER_TOKEN_CAST",
    "PER_BLOCK_CAST",
    "per_token_cast_to_fp8",
    "per_block_cast_to_fp8",
    "per_token_cast_reference",
    "per_block_cast_reference",
    "dequantize_per_token",
    "dequantize_per_block",
]

BLOCK = 128
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

PER_TOKEN_CAST = declare(
    "per_token_cast_to_fp8", "hal_per_token_cast_to_fp8", "gemm", "FP8 cast with one scale per token per 128 channels"
)
PER_BLOCK_CAST = declare(
    "per_block_cast_to_fp8", "hal_per_block_cast_to_fp8", "gemm", "FP8 cast with one scale per 128x128 block"
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def per_token_cast_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (fp8 [M, K], float32 [M, K // 128])."""
    m, k = x.shape
    view = x.view(m, k // BLOCK, BLOCK).float()
    amax = view.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    quantised = (view * (FP8_MAX / amax).unsqueeze(2)).to(FP8).view(m, k)
    return quantised, amax / FP8_MAX


def per_block_cast_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (fp8 [N, K], float32 [ceil(N/128), ceil(K/128)]); edges padded with zeros."""
    n, k = x.shape
    rows, cols = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK, dtype=torch.float32, device=x.device)
    padded[:n, :k] = x.float()
    view = padded.view(rows, BLOCK, cols, BLOCK)
    amax = view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_FLOOR)
    quantised = (view * (FP8_MAX / amax)).to(FP8).view(rows * BLOCK, cols * BLOCK)[:n, :k].contiguous()
    return quantised, (amax / FP8_MAX).view(rows, cols)


def dequantize_per_token(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 [..., K] with float32 scales [..., K // 128] -> float32 [..., K]."""
    return (x.float().unflatten(-1, (-1, BLOCK)) * scales.float().unsqueeze(-1)).flatten(-2)


def dequantize_per_block(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 [..., N, K] with float32 scales [..., ceil(N/128), ceil(K/128)] -> float32 [..., N, K]."""
    n, k = x.shape[-2:]
    expanded = scales.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return x.float() * expanded[..., :n, :k]


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations per token and per 128 channels (the LHS format of the FP8 GEMMs).

    Args:
        x: [M, K] bf16/fp16/fp32, K a multiple of 128.

    Returns:
        ``(float8_e4m3fn [M, K] contiguous, float32 [M, K // 128] scales)``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hal.per_token_cast_to_fp8(x)
    op = PER_TOKEN_CAST.name
    expect_tensor(op, "x", x, dtypes=FLOAT_DTYPES, shape=(None, None), dims=("M", "K"), contiguous=True)
    if x.shape[1] % BLOCK:
        raise ShapeError(op, "x", f"K a multiple of {BLOCK}", f"K={x.shape[1]}", "Pad the channels to a multiple of 128.")
    return call(PER_TOKEN_CAST, "x", x.device, x=x)


def per_block_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise weights per 128x128 block (the RHS format of the FP8 GEMMs).

    Args:
        x: [N, K] bf16/fp16/fp32, any sizes (partial edge blocks are scaled on their own values).

    Returns:
        ``(float8_e4m3fn [N, K] contiguous, float32 [ceil(N/128), ceil(K/128)] scales)``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hal.per_block_cast_to_fp8(x)
    expect_tensor(PER_BLOCK_CAST.name, "x", x, dtypes=FLOAT_DTYPES, shape=(None, None), dims=("N", "K"))
    return call(PER_BLOCK_CAST, "x", x.device, x=x)
