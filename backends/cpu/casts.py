"""DeepGEMM's FP8 casts and FlashMLA's FP8 KV cache quantisation on the native kernels (``native/fp8_cast.c``): ctypes calls on the tensors' memory.

Bit for bit :func:`hal.ops.fp8_quant.per_token_cast_reference` and
:func:`~hal.ops.fp8_quant.per_block_cast_reference` (codes and scales; the sign bit of a NaN code or
scale follows a multiply's operand order, as in torch's own kernels), near memory speed: one pass
per 128-value slice in L1 where the reference materialises fp32 copies, a padded block matrix
and a product tensor. Inputs bf16, fp16 or float32 with contiguous rows (``per_token`` gets a
contiguous tensor from the ops layer; a ``per_block`` input with another column stride is copied).
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["per_token_cast", "per_block_cast", "mla_kv_cache"]

_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride (the ops layer has checked its dtype: bf16, fp16 or float32)."""
    return x if x.stride(1) == 1 else x.contiguous()


def per_token_cast(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 128 == 0) -> (float8_e4m3fn [M, K], float32 [M, K // 128])."""
    x = _rows(x)
    m, k = x.shape
    if k % 128:
        raise ValueError(f"native per-token cast: K={k} is not a multiple of 128 (the ops layer pads or rejects it)")
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    scales = torch.empty(m, k // 128, dtype=torch.float32)
    if m and k:
        rc = lib.hal_cast_per_token(x.data_ptr(), _DTYPES[x.dtype], m, k, x.stride(0), codes.data_ptr(), scales.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native per-token cast: unexpected dtype {x.dtype}")
    return codes, scales


def per_block_cast(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8_e4m3fn [N, K], float32 [ceil(N/128), ceil(K/128)])."""
    x = _rows(x)
    n, k = x.shape
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scales = torch.empty(-(-n // 128), -(-k // 128), dtype=torch.float32)
    if n and k:
        rc = lib.hal_cast_per_block(x.data_ptr(), _DTYPES[x.dtype], n, k, x.stride(0), codes.data_ptr(), scales.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native per-block cast: unexpected dtype {x.dtype}")
    return codes, scales


def mla_kv_cache(lib: ctypes.CDLL, k_cache: torch.Tensor) -> torch.Tensor:
    """k_cache [blocks, page, 1, 576] bf16/fp16/fp32 (any block and token strides) -> FlashMLA's FP8
    records, float8_e4m3fn [blocks, page, 1, 656] (:func:`hal.ops.mla_fp8_cache.quantize_mla_kv_cache_reference`'s
    bytes, NaN bits aside: a NaN tile's scale is the canonical NaN, a NaN rope value 0x7fc0 where
    the reference's vectorised conversion writes 0xffff)."""
    x = k_cache if k_cache.stride(3) == 1 else k_cache.contiguous()
    blocks, page = x.shape[:2]
    out = torch.empty(blocks, page, 656, dtype=torch.uint8)
    if blocks and page:
        rc = lib.hal_cast_mla_kv_cache(x.data_ptr(), _DTYPES[x.dtype], blocks, page, x.stride(0), x.stride(1), out.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native MLA KV cache quantisation: unexpected dtype {x.dtype}")
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, 656)
