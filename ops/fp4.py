"""FP4 (e2m1) helpers of DeepGEMM's ``deep_gemm.utils``, in torch: quantise, transpose, dequantise.

DeepGEMM's SM100 recipes take FP4 operands as int8 bytes holding two e2m1 codes (the even element
in the low nibble, the odd one in the high nibble), with one scale per ``gran_k`` elements of a
row. hal's GEMMs take FP8 operands; these helpers exist so that code (and tests) written against
``deep_gemm.utils`` import and build their data the same way on any device.

Numerics (DeepGEMM's helpers, step for step):

- scales: ``sf = max(amax, 1e-4) / 6`` per row and ``gran_k`` columns (zero padding past the
  row's end), rounded up to a power of two with ``use_ue8m0`` (:func:`hal.ops.ue8m0.ceil_to_ue8m0`);
  packed four per int32 with ``use_packed_ue8m0``, padded with 1.0 to a multiple of 4;
- codes: ``x * (1 / sf)`` onto {0, 0.5, 1, 1.5, 2, 3, 4, 6}: a magnitude goes to the larger value
  only when it lies strictly above the midpoint (ties go down), anything above 5 is 6, NaN is 0;
  the sign bit (0x8) is set only for a negative value with a nonzero code (no -0);
- dequantised values: ``e2m1(code) * sf`` in float32.
"""

from __future__ import annotations

import torch

from hal.errors import ShapeError, ValueRangeError
from hal.ops.ue8m0 import AMAX_FLOOR, _align, _pack_padded, _tensor, ceil_to_ue8m0, unpack_ue8m0_from_int

__all__ = ["E2M1_VALUES", "per_token_cast_to_fp4", "transpose_packed_fp4", "cast_back_from_fp4"]

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of codes 0..7
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive magnitudes


def _codes(x: torch.Tensor) -> torch.Tensor:
    """float32 -> e2m1 codes (uint8, 0..15): the magnitude's index rounded as above, sign in bit 3."""
    magnitude = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint in _MIDPOINTS:
        code += (magnitude > midpoint).to(torch.uint8)
    negative = (x < 0) & (code != 0)
    return code | (negative.to(torch.uint8) << 3)


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [m, 2j] -> int8 [m, j]: element 2i in the low nibble, 2i + 1 in the high one."""
    pairs = codes.view(codes.shape[0], codes.shape[1] // 2, 2)  # explicit sizes: -1 cannot be told from 0 elements
    return ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).view(torch.int8)


def _unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """int8 [m, j] -> uint8 codes [m, 2j] (the inverse of :func:`_pack_pairs`)."""
    bytes_ = packed.view(torch.uint8)
    return torch.stack((bytes_ & 0x0F, bytes_ >> 4), dim=2).view(packed.shape[0], 2 * packed.shape[1])


def _packed(op: str, name: str, value: object) -> torch.Tensor:
    return _tensor(op, name, value, torch.int8, dims=("rows", "packed columns"))


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (N even) -> (int8 [M, N / 2] packed e2m1 codes, scales).

    Scales: float32 [M, ceil(N / gran_k)]; with ``use_packed_ue8m0`` (which needs ``use_ue8m0``)
    int32 [M, ceil(ceil(N / gran_k) / 4)], padded with 1.0 scales."""
    op = "per_token_cast_to_fp4"
    m, n = _tensor(op, "x", x, dims=("M", "N")).shape
    if n % 2:
        raise ShapeError(op, "x", "an even number of columns (two e2m1 codes per byte)", f"N={n}", "Pad the row with a zero column.")
    if isinstance(gran_k, bool) or not isinstance(gran_k, int) or gran_k < 2 or gran_k % 2:
        raise ValueRangeError(op, "gran_k", "a positive even int (32 or 128 in DeepGEMM's recipes)", repr(gran_k), "Pass gran_k=32 or 128.")
    if use_packed_ue8m0 and not use_ue8m0:
        raise ValueRangeError(op, "use_packed_ue8m0", "False unless use_ue8m0=True", "True", "Pass use_ue8m0=True to pack the scales.")
    padded = torch.zeros(m, _align(n, gran_k), dtype=torch.float32, device=x.device)
    padded[:, :n] = x.float()
    view = padded.view(m, padded.shape[1] // gran_k, gran_k)
    sf = view.abs().amax(dim=2).clamp(min=AMAX_FLOOR) / E2M1_MAX
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    codes = _codes(view * (1.0 / sf).unsqueeze(2)).view(m, padded.shape[1])
    packed = _pack_pairs(codes)[:, : n // 2].contiguous()
    return packed, (_pack_padded(sf) if use_packed_ue8m0 else sf)


def transpose_packed_fp4(a: torch.Tensor) -> torch.Tensor:
    """int8 [M, N / 2] packed codes (M even) -> int8 [N, M / 2]: the code matrix transposed, repacked."""
    op = "transpose_packed_fp4"
    a = _packed(op, "a", a)
    if a.shape[0] % 2:
        raise ShapeError(op, "a", "an even number of rows (they become packed pairs)", f"M={a.shape[0]}", "Pad with a zero row.")
    return _pack_pairs(_unpack_pairs(a).t().contiguous()).contiguous()


def cast_back_from_fp4(packed: torch.Tensor, sf: torch.Tensor, gran_k: int = 128, use_packed_ue8m0: bool = False) -> torch.Tensor:
    """int8 [M, N / 2] packed codes and their scales -> float32 [M, N]: ``e2m1(code) * sf[m, n // gran_k]``.

    ``sf``: float32 [M, >= ceil(N / gran_k)], or int32 packed UE8M0 with ``use_packed_ue8m0``."""
    op = "cast_back_from_fp4"
    packed = _packed(op, "packed", packed)
    if isinstance(gran_k, bool) or not isinstance(gran_k, int) or gran_k < 1:
        raise ValueRangeError(op, "gran_k", "a positive int", repr(gran_k), "Pass the gran_k the scales were made with.")
    sf = _tensor(op, "sf", sf, torch.int32 if use_packed_ue8m0 else torch.float32, dims=("M", "scale columns"))
    scales = unpack_ue8m0_from_int(sf) if use_packed_ue8m0 else sf
    m, n = packed.shape[0], packed.shape[1] * 2
    if scales.shape[0] != m or scales.shape[1] * gran_k < n:
        raise ShapeError(op, "sf", f"[{m}, >= {-(-n // gran_k)}] scales (one per {gran_k} columns)", f"{list(scales.shape)}",
                         "Pass the scales per_token_cast_to_fp4 returned with the same gran_k.")
    codes = _unpack_pairs(packed)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    values = table[(codes & 0x07).long()]
    values = torch.where(((codes & 0x08) != 0) & ((codes & 0x07) != 0), -values, values)  # code 8 is +0, as DeepGEMM's
    columns = torch.arange(n, device=packed.device) // gran_k
    return values * scales[:, columns]
