/* Bit-level float helpers shared by unihal's native CPU kernels (static inline: each kernel file
 * that includes this has its own copy, and exports nothing from it). */
#ifndef HAL_NATIVE_FLOAT_BITS_H
#define HAL_NATIVE_FLOAT_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t fb_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fb_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp16 bits -> the same value in fp32 (exact; inf and NaN kept, NaN payload shifted along). Every
 * path is computed and one picked by a bit mask: with a ?: between the two floats GCC 12 put the
 * branch back and left the loops scalar. */
static inline float fb_f16_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    const float sub = (float)man * fb_float(0x33800000u); /* zero and subnormals: man * 2^-24, exact */
    const uint32_t normal = exp == 0x1fu ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13);
    const uint32_t zero = -(uint32_t)(exp == 0);
    return fb_float((fb_bits(sub) & zero) | (normal & ~zero) | sign);
}

/* fp32 -> bf16 bits as torch rounds: to nearest even; NaN: 0x7fc0 (torch's scalar conversion;
 * its vectorised one writes 0xffff, or the payload with AVX-512 BF16: NaN bits are not compared). */
static inline uint16_t fb_f32_bf16(float f) {
    const uint32_t u = fb_bits(f);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif /* HAL_NATIVE_FLOAT_BITS_H */
