"""FlashMLA's FP8 KV cache (DeepSeek-V3.2): 656 bytes per token, quantised and read back.

Layout of one token (``k_cache`` float8_e4m3fn [num_blocks, page_block_size, 1, 656], the bytes
of each token contiguous; blocks may be further apart than ``page_block_size * 656`` bytes, as
FlashMLA's own test allocates them):

- bytes 0..511: the 512 latent ("nope") values as float8_e4m3fn;
- bytes 512..527: 4 float32 scales, one per 128 latent values (tile), each a power of two (a
  UE8M0 value stored as fp32): the smallest power of two >= ``max(amax / 448, 1e-4)`` (FlashMLA's
  ``tests/quant.py`` recipe; the clamp applies to the scale, not to amax). We round up exactly,
  from the float32 bits; the anchor's helper takes ``ceil(log2(x))`` in float32, which for ``x``
  a few ulps above a power of two can land on that power instead. Both decode within the fp8
  rounding; unihal's backends all follow the exact rule;
- bytes 528..655: the 64 rope values as bfloat16, unquantised.

Dequantised latent = fp8 value x its tile's scale (exact in fp32: the scale is a power of two);
rope is taken as is. Every backend reads the cache through this definition.

Quantising is the dispatched operator ``quantize_mla_kv_cache`` (every engine writes its cache
with it, so its rounding is part of the contract); NaN in a tile makes its scale and codes NaN.
"""

from __future__ import annotations

import torch

from hal.checks import expect_tensor
from hal.dispatch import call
from hal.errors import LayoutError
from hal.operator import declare

__all__ = [
    "FP8_TOKEN_BYTES", "LATENT", "ROPE", "TILE", "TILES", "QUANTIZE_MLA_KV_CACHE", "quantize_mla_kv_cache", "quantize_mla_kv_cache_reference",
    "dequantize_mla_kv_cache", "decode_mla_records", "check_fp8_kv_cache", "ue8m0_scale",
    "MODEL1_DIM", "MODEL1_NOPE", "MODEL1_DATA_BYTES", "MODEL1_TOKEN_BYTES", "model1_page_bytes", "model1_pages_fit", "model1_pages", "check_model1_kv_cache", "dequantize_model1_kv_cache", "decode_model1_tokens", "quantize_model1_kv_cache",
]

QUANTIZE_MLA_KV_CACHE = declare(
    "quantize_mla_kv_cache", "hal_quantize_mla_kv_cache", "mla", "bf16 MLA cache -> FlashMLA's 656-byte FP8 records (DeepSeek-V3.2)"
)

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


def ue8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 tile amax -> the smallest power of two >= max(amax / 448, 1e-4), exactly; NaN stays NaN."""
    x = torch.clamp_min(amax.float() / 448.0, 1e-4)  # clamp_min keeps NaN
    bits = x.view(torch.int32)
    exponent = bits & 0x7F800000
    up = torch.where((bits & 0x7FFFFF) == 0, exponent, exponent + (1 << 23))  # x itself when a power of two
    return torch.where(torch.isfinite(x), up.view(torch.float32), x)


def quantize_mla_kv_cache_reference(k_cache: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`quantize_mla_kv_cache` (validated input)."""
    blocks, page = k_cache.shape[:2]
    values = k_cache.reshape(blocks, page, LATENT + ROPE).float()
    latent = values[..., :LATENT].reshape(blocks, page, TILES, TILE)
    amax = latent.abs().amax(dim=-1)  # NaN-propagating
    scales = ue8m0_scale(amax)  # [blocks, page, TILES]
    codes = (latent / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(blocks, page, LATENT)
    out = torch.empty(blocks, page, FP8_TOKEN_BYTES, dtype=torch.uint8, device=k_cache.device)
    out[..., :LATENT] = codes.view(torch.uint8)
    out[..., SCALE_OFFSET:ROPE_OFFSET] = scales.contiguous().view(torch.uint8).view(blocks, page, 4 * TILES)
    out[..., ROPE_OFFSET:] = values[..., LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8).view(blocks, page, 2 * ROPE)
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, FP8_TOKEN_BYTES)


def quantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """Quantise an MLA cache to FlashMLA's FP8 layout (see the module docstring).

    Args:
        k_cache: bf16/fp16/fp32 [num_blocks, page_block_size, 1, 576] (any strides).

    Returns:
        float8_e4m3fn [num_blocks, page_block_size, 1, 656], contiguous.
    """
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.quantize_mla_kv_cache(k_cache)
    op = "quantize_mla_kv_cache"
    expect_tensor(
        op, "k_cache", k_cache, dtypes=(torch.bfloat16, torch.float16, torch.float32), shape=(None, None, 1, LATENT + ROPE),
        dims=("num_blocks", "page_block_size", "h_kv", "d"),
    )
    return call(QUANTIZE_MLA_KV_CACHE, "k_cache", k_cache.device, k_cache=k_cache)


def dequantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """The FP8 cache [.., 1, 656] -> float32 [num_blocks, page_block_size, 1, 576] (exact)."""
    cache = check_fp8_kv_cache("dequantize_mla_kv_cache", "k_cache", k_cache)
    blocks, page = cache.shape[:2]
    return decode_mla_records(cache.reshape(blocks, page, FP8_TOKEN_BYTES).view(torch.uint8)).view(blocks, page, 1, LATENT + ROPE)


def decode_mla_records(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] records of the FP8 cache (any leading shape: a cache's pages, or the
    tokens a call gathered) -> float32 [..., 576], exactly."""
    codes = raw[..., :LATENT].contiguous().view(torch.float8_e4m3fn).float().unflatten(-1, (TILES, TILE))
    scales = raw[..., SCALE_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32)  # [..., TILES]
    rope = raw[..., ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()
    return torch.cat([(codes * scales.unsqueeze(-1)).flatten(-2), rope], dim=-1)


# --- FlashMLA's MODEL1_FP8Sparse layout (the model after V3.2: 512-wide keys, V the whole key) ---
#
# A page of ``page`` tokens is one run of bytes: every token's 448 e4m3 NoPE values then its 64
# bf16 RoPE values (576 bytes each, tokens adjacent), then every token's 8 scale bytes (7 UE8M0
# exponents, one per 64 NoPE values, and a pad byte); FlashMLA pads each page to a multiple of 576
# bytes. The cache tensor is the view float8_e4m3fn [num_blocks, page, 1, 584] of that buffer
# (strides ``(page_bytes, 584, 584, 1)``): its shape says 584 bytes per token, but a token's
# bytes are where the layout puts them, not at ``slot * 584``.
MODEL1_NOPE = 448
MODEL1_ROPE = 64
MODEL1_DIM = MODEL1_NOPE + MODEL1_ROPE  # 512 = d_qk = d_v
MODEL1_TILE = 64
MODEL1_TILES = MODEL1_NOPE // MODEL1_TILE  # 7
MODEL1_DATA_BYTES = MODEL1_NOPE + 2 * MODEL1_ROPE  # 576
MODEL1_SCALE_BYTES = 8
MODEL1_TOKEN_BYTES = MODEL1_DATA_BYTES + MODEL1_SCALE_BYTES  # 584


def model1_page_bytes(page: int) -> int:
    """Bytes of one page of the MODEL1 layout as FlashMLA allocates it (a multiple of 576)."""
    return -(-page * MODEL1_TOKEN_BYTES // MODEL1_DATA_BYTES) * MODEL1_DATA_BYTES


def model1_pages_fit(cache: torch.Tensor) -> bool:
    """Whether a MODEL1 cache view's last page ends within its storage (a dense 4-d tensor): what
    its layout check reads beyond the shape and strides."""
    blocks, page, _, _ = cache.shape  # unpacked: slicing a Size costs 0.25 us
    return cache.storage_offset() + (blocks - 1) * cache.stride(0) + page * MODEL1_TOKEN_BYTES <= cache.untyped_storage().nbytes()


def check_model1_kv_cache(op: str, name: str, k_cache: object) -> torch.Tensor:
    """float8_e4m3fn [num_blocks, page_block_size, 1, 584]: the view FlashMLA makes of its MODEL1 pages."""
    cache = expect_tensor(
        op, name, k_cache, dtypes=torch.float8_e4m3fn, shape=(None, None, 1, MODEL1_TOKEN_BYTES),
        dims=("num_blocks", "page_block_size", "h_kv", "bytes per token"),
    )
    blocks, page = cache.shape[:2]
    if cache.numel() == 0:
        return cache
    laid_out = cache.stride(3) == 1 and (page == 1 or cache.stride(1) == MODEL1_TOKEN_BYTES) and (blocks == 1 or cache.stride(0) >= page * MODEL1_TOKEN_BYTES)
    if not laid_out or not model1_pages_fit(cache):
        raise LayoutError(
            op, name, f"pages of {page} x {MODEL1_TOKEN_BYTES} bytes (FlashMLA's MODEL1_FP8Sparse: data of every token, then its scales), "
            "each page whole in the storage", f"strides {tuple(cache.stride())} over {cache.untyped_storage().nbytes()} bytes",
            "Build the cache with hal.quantize_model1_kv_cache or FlashMLA's quantize_k_cache(MODEL1_FP8Sparse).",
        )
    return cache


def model1_pages(cache: torch.Tensor) -> torch.Tensor:
    """uint8 [num_blocks, page * 584]: each page's bytes, read through the cache's storage."""
    blocks, page = cache.shape[:2]
    raw = torch.empty(0, dtype=torch.uint8, device=cache.device).set_(cache.untyped_storage())
    return raw.as_strided((blocks, page * MODEL1_TOKEN_BYTES), (cache.stride(0), 1), cache.storage_offset())


def dequantize_model1_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """The MODEL1 FP8 cache -> float32 [num_blocks, page_block_size, 1, 512] (exact: codes times
    powers of two; a scale byte of 255 is NaN, as UE8M0 says)."""
    cache = check_model1_kv_cache("dequantize_model1_kv_cache", "k_cache", k_cache)
    blocks, page = cache.shape[:2]
    pages = model1_pages(cache)
    data = pages[:, : page * MODEL1_DATA_BYTES].reshape(blocks, page, MODEL1_DATA_BYTES)
    exponents = pages[:, page * MODEL1_DATA_BYTES :].reshape(blocks, page, MODEL1_SCALE_BYTES)[..., :MODEL1_TILES]
    return decode_model1_tokens(data, exponents).view(blocks, page, 1, MODEL1_DIM)


def decode_model1_tokens(data: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """MODEL1 tokens -> float32 [..., 512], exactly: ``data`` uint8 [..., 576] (448 e4m3 codes, then
    64 bf16 values), ``exponents`` uint8 [..., 7] (UE8M0: 2^(e - 127), 255 NaN), any leading shape
    (a cache's pages, or the tokens a call gathered)."""
    codes = data[..., :MODEL1_NOPE].contiguous().view(torch.float8_e4m3fn).float().unflatten(-1, (MODEL1_TILES, MODEL1_TILE))
    rope = data[..., MODEL1_NOPE:].contiguous().view(torch.bfloat16).float()
    exponents = exponents.float()
    scales = torch.where(exponents == 255, torch.nan, torch.exp2(exponents - 127))
    return torch.cat([(codes * scales.unsqueeze(-1)).flatten(-2), rope], dim=-1)


def quantize_model1_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """bf16 [num_blocks, page_block_size, 1, 512] -> FlashMLA's MODEL1_FP8Sparse cache (the
    float8_e4m3fn [num_blocks, page_block_size, 1, 584] view of pages padded to 576 bytes).

    Per token and 64 NoPE values: scale = the smallest power of two >= max(amax / 448, 1e-4),
    codes = e4m3(x / scale); the 64 RoPE values stay bf16. Torch on the cache's device."""
    op = "quantize_model1_kv_cache"
    expect_tensor(op, "k_cache", k_cache, dtypes=torch.bfloat16, shape=(None, None, 1, MODEL1_DIM), dims=("num_blocks", "page_block_size", "h_kv", "d"))
    blocks, page = k_cache.shape[:2]
    page_bytes = model1_page_bytes(page)
    buffer = torch.zeros(blocks, page_bytes, dtype=torch.uint8, device=k_cache.device)
    values = k_cache.reshape(blocks, page, MODEL1_DIM)
    nope = values[..., :MODEL1_NOPE].float().view(blocks, page, MODEL1_TILES, MODEL1_TILE)
    scales = ue8m0_scale(nope.abs().amax(dim=-1))  # [blocks, page, tiles]
    codes = (nope / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8).view(blocks, page, MODEL1_NOPE)
    data = buffer[:, : page * MODEL1_DATA_BYTES].view(blocks, page, MODEL1_DATA_BYTES)
    data[..., :MODEL1_NOPE] = codes
    data[..., MODEL1_NOPE:] = values[..., MODEL1_NOPE:].contiguous().view(torch.uint8)
    exponents = torch.where(torch.isnan(scales), 255, (scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    buffer[:, page * MODEL1_DATA_BYTES : page * MODEL1_TOKEN_BYTES].view(blocks, page, MODEL1_SCALE_BYTES)[..., :MODEL1_TILES] = exponents
    view = buffer.view(torch.float8_e4m3fn)[:, : page * MODEL1_TOKEN_BYTES]
    return view.as_strided((blocks, page, 1, MODEL1_TOKEN_BYTES), (page_bytes, MODEL1_TOKEN_BYTES, MODEL1_TOKEN_BYTES, 1))
