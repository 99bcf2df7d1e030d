"""FlashMLA's FP8 KV cache (DeepSeek-V3.2): 656 bytes per token, quantised and read back.

Layout of one token (``k_cache`` float8_e4m3fn [num_blocks, page_block_size, 1, 656], the bytes
of each token contiguous; blocks may be further apart than ``page_block_size * 656`` bytes, as
FlashMLA's own test allocates them):

- bytes 0..511: the 512 latent ("nope") values as float8_e4m3fn;
- bytes 512..527: 4 float32 scales, one per 128 latent values (tile), each a power of two (a
  UE8M0 value stored as fp32): ``2 ** ceil(log2(max(amax, 1e-4) / 448))``;
- bytes 528..655: the 64 rope values as bfloat16, unquantised.

Dequantised latent = fp8 value x its tile's scale (exact in fp32: the scale is a power of two);
rope is taken as is. Every backend reads the cache through this definition.
"""

from __future__ import annotations

import torch

from hal.checks import expect_tensor
from hal.errors import LayoutError

__all__ = [
    "FP8_TOKEN_BYTES", "LATENT", "ROPE", "TILE", "TILES", "quantize_mla_kv_cache", "dequantize_mla_kv_cache", "check_fp8_kv_cache",
]

LATENT = 512
ROPE = 64
TILE = 128
TILES = LATENT // TILE
SCALE_OFFSET = LATENT
ROPE_OFFSET = LATENT + 4 * TILES
FP8_TOKEN_BYTES = ROPE_OFFSET + 2 * ROPE  # 656


def check_fp8_kv_cache(op: str, name: str, k_cache: object) -> torch.Tensor:
    """float8_e4m3fn [num_blocks, page_block_size, 1, 656], each token's 656 bytes contiguous."""
    cache = expect_tensor(
        op, name, k_cache, dtypes=torch.float8_e4m3fn, shape=(None, None, 1, FP8_TOKEN_BYTES),
        dims=("num_blocks", "page_block_size", "h_kv", "bytes per token"),
    )
    if cache.numel() and (cache.stride(3) != 1 or (cache.shape[1] > 1 and cache.stride(1) != FP8_TOKEN_BYTES)):
        raise LayoutError(
            op, name, f"each token's {FP8_TOKEN_BYTES} bytes contiguous and tokens of a page adjacent",
            f"strides {tuple(cache.stride())}", "Build the cache with hal.quantize_mla_kv_cache or FlashMLA's layout.",
        )
    return cache


def quantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """bf16/fp16/fp32 [num_blocks, page_block_size, 1, 576] -> the FP8 cache [.., 1, 656] (see module docstring)."""
    op = "quantize_mla_kv_cache"
    expect_tensor(op, "k_cache", k_cache, dtypes=(torch.bfloat16, torch.float16, torch.float32), shape=(None, None, 1, LATENT + ROPE))
    blocks, page = k_cache.shape[:2]
    values = k_cache.reshape(blocks, page, LATENT + ROPE).float()
    latent = values[..., :LATENT].view(blocks, page, TILES, TILE)
    amax = latent.abs().amax(dim=-1).clamp(min=1e-4)
    scales = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))  # [blocks, page, TILES]
    codes = (latent / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(blocks, page, LATENT)
    out = torch.empty(blocks, page, FP8_TOKEN_BYTES, dtype=torch.uint8, device=k_cache.device)
    out[..., :LATENT] = codes.view(torch.uint8)
    out[..., SCALE_OFFSET:ROPE_OFFSET] = scales.contiguous().view(torch.uint8).view(blocks, page, 4 * TILES)
    out[..., ROPE_OFFSET:] = values[..., LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8).view(blocks, page, 2 * ROPE)
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, FP8_TOKEN_BYTES)


def dequantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """The FP8 cache [.., 1, 656] -> float32 [num_blocks, page_block_size, 1, 576] (exact)."""
    cache = check_fp8_kv_cache("dequantize_mla_kv_cache", "k_cache", k_cache)
    blocks, page = cache.shape[:2]
    raw = cache.reshape(blocks, page, FP8_TOKEN_BYTES).view(torch.uint8)
    codes = raw[..., :LATENT].contiguous().view(torch.float8_e4m3fn).float().view(blocks, page, TILES, TILE)
    scales = raw[..., SCALE_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32)  # [blocks, page, TILES]
    rope = raw[..., ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    latent = (codes * scales.unsqueeze(-1)).view(blocks, page, LATENT)
    return torch.cat([latent, rope], dim=-1).view(blocks, page, 1, LATENT + ROPE)
