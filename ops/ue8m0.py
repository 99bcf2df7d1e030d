"""UE8M0 scales and DeepGEMM's current cast helpers (its ``deep_gemm.utils``), in torch.

A UE8M0 scale is a power of two: an 8-bit biased exponent, no sign, no mantissa. DeepGEMM's SM100
kernels take scales in that form, four exponents packed per int32 along K; its casts produce
them with ``use_ue8m0=True``: ``sf = 2 ** ceil(log2(amax / 448))`` computed on the float32 bits
(exponent + 1 whenever the mantissa is not zero), clamped to the normal exponents [1, 254].

Every FP8 GEMM of :mod:`hal.ops.gemm_v2` accepts float32 scales (UE8M0 or not) and packed int32
UE8M0 scales, which it unpacks exactly before dispatch. These casts are torch code on the input's
device, as DeepGEMM's own helpers are; the dispatched casts of :mod:`hal.ops.fp8_quant` remain the
operators backends implement.

Cast numerics (DeepGEMM's helpers): amax over each slice clamped below at 1e-4, ``sf = amax /
448`` (then rounded up to UE8M0 when asked), values times ``1 / sf`` rounded to e4m3fn; slices
past the data are zero padding.
"""

from __future__ import annotations

import torch

from hal.errors import DTypeError, ShapeError, ValueRangeError

__all__ = [
    "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int",
    "per_token_cast_to_fp8", "per_channel_cast_to_fp8", "per_block_cast_to_fp8", "per_custom_dims_cast_to_fp8",
    "get_mn_major_tma_aligned_tensor", "get_mn_major_tma_aligned_packed_ue8m0_tensor", "transform_sf_into_required_layout",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def _align(x: int, y: int) -> int:
    return -(-x // y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """float scales -> the smallest power of two >= |x| (float32), exponents clamped to [1, 254]."""
    bits = x.abs().float().contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """float32 powers of two [..., 4k] -> int32 [..., k], four exponent bytes per int (lowest first)."""
    op = "pack_ue8m0_to_int"
    if x.dtype != torch.float32:
        raise DTypeError(op, "x", "float32 UE8M0 scales", f"dtype {x.dtype}", "Round them with ceil_to_ue8m0 first.")
    if x.shape[-1] % 4:
        raise ShapeError(op, "x", "a last dimension that is a multiple of 4", f"{x.shape[-1]}", "Pad the scales with 1.0 to a multiple of 4.")
    bits = x.contiguous().view(torch.int32)
    if bool(((bits < 0) | ((bits & 0x7FFFFF) != 0)).any()):
        raise ValueRangeError(op, "x", "non-negative powers of two (UE8M0 values)", "a value with a sign or a mantissa", "Round with ceil_to_ue8m0.")
    return (bits >> 23).to(torch.uint8).view(torch.int32)


def _pack_padded(sf: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales [..., n] packed four per int32, padded with 1.0 (exponent 127) to a multiple of 4."""
    columns = sf.shape[-1]
    return pack_ue8m0_to_int(torch.nn.functional.pad(sf, (0, _align(columns, 4) - columns), value=1.0))


def unpack_ue8m0_from_int(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., k] -> float32 [..., 4k]: the inverse of :func:`pack_ue8m0_to_int` (exact)."""
    # Row-major copy (contiguous() keeps odd strides of size-1 dimensions; byte views need unit ones).
    dense = packed.clone(memory_format=torch.contiguous_format)
    return (dense.view(torch.uint8).to(torch.int32) << 23).view(torch.float32)


def _scales(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scales [M, ceil(K / gran_k)]); packed int32 [M, ceil(ceil(K/gran_k)/4)] with use_packed_ue8m0."""
    if x.dim() != 2:
        raise ShapeError("per_token_cast_to_fp8", "x", "a 2-d tensor [M, K]", f"{x.dim()}-d", "Flatten the tokens.")
    m, k = x.shape
    padded = torch.zeros(m, _align(k, gran_k), dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    view = padded.view(m, -1, gran_k)
    sf = _scales(view.abs().amax(dim=2), use_ue8m0 or use_packed_ue8m0)
    values = (view * (1.0 / sf).unsqueeze(2)).to(FP8).view(m, -1)[:, :k].contiguous()
    return values, (_pack_padded(sf) if use_packed_ue8m0 else sf)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (M a multiple of gran_k) -> (e4m3 [M, N], scales [M / gran_k, N]): one scale per gran_k rows of a column."""
    m, n = x.shape
    if m % gran_k:
        raise ShapeError("per_channel_cast_to_fp8", "x", f"rows a multiple of {gran_k}", f"{m}", "Pad the rows.")
    view = x.float().view(-1, gran_k, n)
    sf = _scales(view.abs().amax(dim=1), use_ue8m0)
    return (view * (1.0 / sf).unsqueeze(1)).to(FP8).view(m, n), sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] -> (e4m3 [M, N], scales [ceil(M / gran_k), ceil(N / gran_k)]), one per gran_k x gran_k block."""
    m, n = x.shape
    padded = torch.zeros(_align(m, gran_k), _align(n, gran_k), dtype=torch.float32, device=x.device)
    padded[:m, :n] = x.float()
    view = padded.view(-1, gran_k, padded.shape[1] // gran_k, gran_k)
    sf = _scales(view.abs().amax(dim=(1, 3), keepdim=True), use_ue8m0)
    values = (view * (1.0 / sf)).to(FP8).view_as(padded)[:m, :n].contiguous()
    return values, sf.view(view.shape[0], view.shape[2])


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims: tuple[int, ...], use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per index of ``dims`` (amax over the other dimensions): the indexer's per-key cast is ``dims=(0,)``."""
    others = tuple(i for i in range(x.dim()) if i not in set(dims))
    sf = _scales(x.abs().float().amax(dim=others, keepdim=True), use_ue8m0)
    return (x.float() * (1.0 / sf)).to(FP8), sf.squeeze()


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Scales [(G,) MN, K'] in DeepGEMM's MN-major layout, MN padded so each column starts 16-byte aligned."""
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    groups, mn, columns = batched.shape
    aligned = _align(mn, 16 // sf.element_size())
    if batched.stride(1) == 1 and (columns <= 1 or batched.stride(2) == aligned):
        return sf
    storage = torch.empty(groups, columns, aligned, dtype=sf.dtype, device=sf.device)
    storage[:, :, :mn] = batched.transpose(1, 2)
    out = storage[:, :, :mn].transpose(1, 2)
    return out if sf.dim() == 3 else out.squeeze(0)


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor) -> torch.Tensor:
    """float32 UE8M0 scales [(G,) MN, K'] -> packed int32 [(G,) MN, ceil(K'/4)] in the MN-major aligned layout."""
    return get_mn_major_tma_aligned_tensor(_pack_padded(ceil_to_ue8m0(sf)))


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None, is_sfa: bool | None = None,
                                      disable_ue8m0_cast: bool = False, psum_layout=None) -> torch.Tensor:
    """hal's GEMMs take scales in any layout and either form, so this returns the float32 scales
    (unpacked if packed) in the MN-major aligned layout DeepGEMM's SM90 kernels use."""
    if sf.dtype == torch.int32:
        sf = unpack_ue8m0_from_int(sf)[..., : -(-k // 128)]
    return get_mn_major_tma_aligned_tensor(sf)
