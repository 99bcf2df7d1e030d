"""OpenCL C conversions between fp32 and bf16, fp16, float8_e4m3fn, bit-exact with torch's casts.

OpenCL C 1.2 without ``cl_khr_fp16`` has no 16- or 8-bit float arithmetic, so these formats
travel as raw bits (``ushort``, ``uchar``) and every kernel converts with the functions below,
prepended to its source. Encodes round to nearest, ties to even, as torch does:

- bf16: NaN becomes a quiet NaN (torch writes 0x7FC0 or 0xFFFF depending on its code path).
- fp16: magnitudes from 65520 up round to infinity; NaN becomes a quiet NaN.
- e4m3fn (torch 2.13, checked over every code and random values by the tests): finite values
  and infinities beyond 448 saturate to +-448; NaN becomes 0x7F with its sign; below 2**-6 the
  subnormal grid (2**-9) is reached by an fp32 add of 2**14, whose rounding is the fp8 rounding.

Decodes are exact. ``*x16`` variants convert 16 lanes at once for the hot loops; they use
operators only, because some OpenCL compilers (PoCL 3's distribution build) leave builtins such as
``select``, ``mad`` and ``vload16`` as calls.
"""

from __future__ import annotations

__all__ = ["NUMERIC_SOURCE"]

NUMERIC_SOURCE = r"""
/* Some OpenCL compilers (PoCL 3's distribution build among them) call their builtins rather than
   inline them: hot paths here use operators, and blend16 stands in for select. */

/* b where the comparison mask is true (all bits set), else a */
inline uint16 blend16(uint16 a, uint16 b, int16 take_b) { return (a & ~as_uint16(take_b)) | (b & as_uint16(take_b)); }

/* ---- decode: raw bits -> fp32 (exact) ---- */

inline float bf16_to_float(ushort h) { return as_float((uint)h << 16); }

inline float16 bf16x16_to_float(ushort16 h) { return as_float16(convert_uint16(h) << 16); }

inline float fp16_to_float(ushort h) {
    uint sign = (uint)(h & 0x8000u) << 16;
    uint exponent = (h >> 10) & 0x1Fu;
    uint mantissa = h & 0x3FFu;
    if (exponent == 0u) return as_float(sign | as_uint((float)mantissa * 0x1p-24f)); /* zero, subnormal */
    if (exponent == 0x1Fu) return as_float(sign | 0x7F800000u | (mantissa << 13));  /* inf, NaN */
    return as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float16 fp16x16_to_float(ushort16 h) {
    uint16 u = convert_uint16(h);
    uint16 exponent = (u >> 10) & 0x1Fu;
    uint16 mantissa = u & 0x3FFu;
    uint16 bits = ((exponent + 112u) << 23) | (mantissa << 13);
    bits = blend16(bits, 0x7F800000u | (mantissa << 13), exponent == 0x1Fu);
    bits = blend16(bits, as_uint16(convert_float16(mantissa) * 0x1p-24f), exponent == 0u);
    return as_float16(bits | ((u & 0x8000u) << 16));
}

inline float e4m3_to_float(uchar c) {
    uint magnitude = c & 0x7Fu;
    /* exponent bias 7 -> 127: shift the 7 magnitude bits under fp32's exponent and add 120 */
    uint bits = magnitude < 8u ? as_uint((float)magnitude * 0x1p-9f) : (magnitude << 20) + (120u << 23);
    if (magnitude == 0x7Fu) bits = 0x7FC00000u;
    return as_float(bits | ((uint)(c & 0x80u) << 24));
}

inline float16 e4m3x16_to_float(uchar16 c) {
    uint16 u = convert_uint16(c);
    uint16 magnitude = u & 0x7Fu;
    uint16 bits = blend16((magnitude << 20) + (120u << 23), as_uint16(convert_float16(magnitude) * 0x1p-9f), magnitude < 8u);
    bits = blend16(bits, (uint16)0x7FC00000u, magnitude == 0x7Fu);
    return as_float16(bits | ((u & 0x80u) << 24));
}

/* ---- encode: fp32 -> raw bits, round to nearest even ---- */

inline ushort float_to_bf16(float f) {
    uint u = as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (ushort)0x7FC0u;
    return (ushort)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline ushort16 float16_to_bf16(float16 f) {
    uint16 u = as_uint16(f);
    uint16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return convert_ushort16(blend16(rounded, (uint16)0x7FC0u, (u & 0x7FFFFFFFu) > 0x7F800000u));
}

inline ushort float_to_fp16(float f) {
    uint u = as_uint(f);
    uint sign = (u >> 16) & 0x8000u;
    uint magnitude = u & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return (ushort)(sign | 0x7E00u);
    if (magnitude >= 0x477FF000u) return (ushort)(sign | 0x7C00u);   /* >= 65520: rounds to inf */
    if (magnitude < 0x38800000u) {                                    /* below 2**-14: subnormal */
        /* ulp(0.5) = 2**-24 is fp16's subnormal step: the fp32 add does the rounding */
        return (ushort)(sign | (as_uint(as_float(magnitude) + 0.5f) - 0x3F000000u));
    }
    magnitude += ((uint)(15 - 127) << 23) + 0xFFFu + ((magnitude >> 13) & 1u);
    return (ushort)(sign | (magnitude >> 13));
}

inline uchar float_to_e4m3(float f) {
    uint u = as_uint(f);
    uint sign = (u >> 24) & 0x80u;
    uint magnitude = u & 0x7FFFFFFFu;
    uint code;
    if (magnitude > 0x7F800000u) code = 0x7Fu;                     /* NaN keeps its sign */
    else if (magnitude >= 0x43E00000u) code = 0x7Eu;               /* >= 448 and inf saturate */
    else if (magnitude < (121u << 23)) {                           /* below 2**-6: subnormal */
        /* ulp(2**14) = 2**-9 is e4m3's subnormal step: the fp32 add does the rounding */
        code = as_uint(as_float(magnitude) + 16384.0f) - (141u << 23);
    } else {
        code = (magnitude - (120u << 23) + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
    }
    return (uchar)(code | sign);
}

inline uchar16 float16_to_e4m3(float16 f) {
    uint16 u = as_uint16(f);
    uint16 magnitude = u & 0x7FFFFFFFu;
    uint16 subnormal = as_uint16(as_float16(magnitude) + 16384.0f) - (141u << 23);
    uint16 normal = (magnitude - (120u << 23) + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
    uint16 code = blend16(normal, subnormal, magnitude < (121u << 23));
    code = blend16(code, (uint16)0x7Eu, magnitude >= 0x43E00000u);
    code = blend16(code, (uint16)0x7Fu, magnitude > 0x7F800000u);
    return convert_uchar16(code | ((u >> 24) & 0x80u));
}
"""
