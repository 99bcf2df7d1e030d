"""Bit-exact float32 conversions inside Triton kernels: to float8_e4m3fn, and to bf16 where
Triton's own conversion is not round-to-nearest-even (its CPU interpreter truncates).

``encode_e4m3fn`` matches ``tensor.to(torch.float8_e4m3fn)`` (torch 2.13, checked over all codes, their midpoints
and random values by the tests): round to nearest even; finite values and infinities beyond the
range saturate to +-448; NaN becomes 0x7F; below 2**-6 the subnormal path rounds through an fp32
add, as c10's ``fp8e4m3fn_from_fp32_value`` does.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["encode_e4m3fn", "decode_e4m3fn", "to_bf16_rne", "round_to", "e4m3fn_bits_as_fnuz", "FNUZ_SCALE"]

# Reinterpreting e4m3fn bits as e4m3fnuz (exponent bias 8 instead of 7) halves every value.
FNUZ_SCALE = 2.0


@triton.jit
def encode_e4m3fn(x):
    """fp32 tensor -> uint8 tensor of e4m3fn codes."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude = bits ^ sign
    # Subnormal results: adding 2**14 aligns the fp8 subnormal grid with fp32's mantissa LSBs.
    shifted = (magnitude.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True)
    subnormal = shifted - (141 << 23)
    odd = (magnitude >> 20) & 1
    normal = (magnitude - (120 << 23) + 0x7FFFF + odd) >> 20
    code = tl.where(magnitude < (121 << 23), subnormal, tl.minimum(normal, 0x7E))
    code = code | (sign >> 24)
    return tl.where(magnitude > 0x7F800000, 0x7F, code).to(tl.uint8)


@triton.jit
def decode_e4m3fn(code):
    """uint8 tensor of e4m3fn codes -> fp32, exactly, with integer ops (0x7F / 0xFF are NaN)."""
    c = code.to(tl.uint32)
    sign = (c & 0x80) << 24
    exponent = (c >> 3) & 0xF
    mantissa = c & 0x7
    normal = (sign | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # mantissa x 2**-9
    subnormal = tl.where(sign != 0, -subnormal, subnormal)
    value = tl.where(exponent == 0, subnormal, normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def to_bf16_rne(x):
    """fp32 tensor -> bf16 tensor, round to nearest even (NaN stays NaN), with integer ops only."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` for a store; bf16 through :func:`to_bf16_rne` when EXACT_BF16."""
    if EXACT_BF16 and dtype == tl.bfloat16:
        return to_bf16_rne(x)
    return x.to(dtype)


@triton.jit
def e4m3fn_bits_as_fnuz(code):
    """uint8 e4m3fn codes -> the e4m3fnuz codes of half their values (exact for every code).

    Only the special codes move: -0 (0x80, NaN in fnuz) becomes +0, and the e4m3fn NaNs
    (0x7F, 0xFF) become fnuz's NaN (0x80). Callers multiply results by FNUZ_SCALE per operand.
    """
    code = tl.where(code == 0x80, 0, code)
    return tl.where((code & 0x7F) == 0x7F, 0x80, code).to(tl.uint8)
