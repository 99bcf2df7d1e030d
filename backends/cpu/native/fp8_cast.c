/* DeepGEMM's FP8 casts (per_token_cast_to_fp8, per_block_cast_to_fp8) and FlashMLA's FP8 KV cache
 * records (quantize_mla_kv_cache, at the end of this file) for the cpu backend of unihal. The
 * casts, bit for bit the reference's (hal.ops.fp8_quant):
 *
 *   amax  = max |x| over the slice (128 channels of one token, or a 128 x 128 block; NaN if any
 *           element is NaN), clamped below at 1e-4f (NaN stays NaN)
 *   code  = e4m3fn(float(x) * factor), factor = (1.0f / amax) * 448.0f: torch evaluates the
 *           reference's `448.0 / amax` as a reciprocal, then a product (Tensor.__rdiv__), and one
 *           division instead moves products onto the other side of an e4m3 tie (bf16 inputs,
 *           whose short mantissas make ties common: 30 of 50k codes in a test). The product is
 *           rounded to fp32, then converted as torch 2.13 converts (round to nearest even; past
 *           448: 448, inf included, where older torch gave NaN from 480 up: no scaled value
 *           gets there, |x| <= amax; NaN: 0x7f; sign kept)
 *   scale = amax / 448.0f
 *
 * Built with the other native kernels (cc -O3 -march=native -std=c11 -ffp-contract=off ...) and
 * called through ctypes by hal.backends.cpu.casts. Self-contained (with float_bits.h): exported
 * symbols are prefixed hal_cast_, all else is static. Plain C written for the compiler to
 * vectorise: the conversions are computed for every path and selected (no branch per element), so
 * a slice is a few passes over 128 values in L1. Tokens (or rows of blocks) are independent:
 * OpenMP threads take them in chunks when there is enough work to pay for waking them.
 */

#include <stdint.h>
#include <string.h>

#include "float_bits.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { CAST_BF16 = 0, CAST_F16 = 1, CAST_F32 = 2 };
#define CAST_BLOCK 128
#define CAST_MIN_PARALLEL (1L << 16) /* elements: below this one thread (a decode batch of 16 x 7168 is 115k) */

/* torch's float -> float8_e4m3fn (c10::detail::fp8e4m3fn_from_fp32_value), every path computed and one selected. */
static inline uint8_t cast_e4m3(float f) {
    uint32_t bits = fb_bits(f);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    const uint32_t denorm_magic = 141u << 23;
    const uint8_t tiny = (uint8_t)(fb_bits(fb_float(bits) + fb_float(denorm_magic)) - denorm_magic);
    uint8_t normal = (uint8_t)((bits + ((uint32_t)(7 - 127) << 23) + 0x7ffffu + ((bits >> 20) & 1u)) >> 20);
    normal = normal == 0x7f ? 0x7e : normal;
    const uint8_t big = bits > 0x7f800000u ? 0x7f : 0x7e;
    const uint8_t code = bits >= (1087u << 20) ? big : bits < (121u << 23) ? tiny : normal;
    return (uint8_t)(code | (sign >> 24));
}

/* float(x[i]) for i < n at x (dtype), into v. */
static inline void cast_widen(const void *x, int dtype, int64_t n, float *restrict v) {
    if (dtype == CAST_BF16) {
        const uint16_t *h = x;
        for (int64_t i = 0; i < n; i++) v[i] = fb_float((uint32_t)h[i] << 16);
    } else if (dtype == CAST_F16) {
        const uint16_t *h = x;
        for (int64_t i = 0; i < n; i++) v[i] = fb_f16_f32(h[i]);
    } else {
        memcpy(v, x, (size_t)n * sizeof(float));
    }
}

/* The bits of the largest |v[i]|, folded into *top. Magnitudes (sign cleared) order as their bit
 * patterns do, and every NaN pattern is above +inf's 0x7f800000: one integer max, which the compiler
 * vectorises (a float max with NaN tests did not). */
static inline void cast_amax(const float *restrict v, int64_t n, uint32_t *top) {
    uint32_t m = *top;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = fb_bits(v[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    *top = m;
}

/* The slice's amax from cast_amax's bits: NaN if any element was NaN (as torch's amax gives it). */
static inline float cast_amax_value(uint32_t top) { return top > 0x7f800000u ? fb_float(0x7fc00000u) : fb_float(top); }

/* The slice's amax after the floor, or NaN (as torch's amax, then clamp, give it). */
static inline float cast_floor(uint32_t top) {
    const float amax = cast_amax_value(top);
    return amax < 1e-4f ? 1e-4f : amax; /* NaN stays */
}

/* The reference's 448.0 / amax as torch computes it: 1 / amax rounded, times 448 rounded. */
static inline float cast_factor(float amax) { return (1.0f / amax) * 448.0f; }

static inline void cast_codes(const float *restrict v, int64_t n, float factor, uint8_t *restrict q) {
    for (int64_t i = 0; i < n; i++) q[i] = cast_e4m3(v[i] * factor);
}

static size_t cast_esize(int dtype) { return dtype == CAST_F32 ? 4 : 2; }

/* x [m, k] (row stride ldx elements, k a multiple of 128) -> q [m, k] codes, s [m, k / 128]. Returns 0, or 1 for a bad dtype. */
int hal_cast_per_token(const void *x, int dtype, int64_t m, int64_t k, int64_t ldx, uint8_t *q, float *s, int threads) {
    if (dtype < CAST_BF16 || dtype > CAST_F32) return 1;
    const size_t es = cast_esize(dtype);
    const int64_t groups = k / CAST_BLOCK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (m * k >= CAST_MIN_PARALLEL)
#else
    (void)threads;
#endif
    for (int64_t r = 0; r < m; r++) {
        float v[CAST_BLOCK] __attribute__((aligned(64)));
        for (int64_t g = 0; g < groups; g++) {
            cast_widen((const char *)x + ((size_t)r * (size_t)ldx + (size_t)g * CAST_BLOCK) * es, dtype, CAST_BLOCK, v);
            uint32_t top = 0;
            cast_amax(v, CAST_BLOCK, &top);
            const float amax = cast_floor(top);
            cast_codes(v, CAST_BLOCK, cast_factor(amax), q + r * k + g * CAST_BLOCK);
            s[r * groups + g] = amax / 448.0f;
        }
    }
    return 0;
}

/* x [n, k] (row stride ldx elements) -> q [n, k] codes, s [ceil(n/128), ceil(k/128)]: each 128 x 128
 * block (partial at the edges, scaled on its own values) by one amax. Returns 0, or 1 for a bad dtype. */
int hal_cast_per_block(const void *x, int dtype, int64_t n, int64_t k, int64_t ldx, uint8_t *q, float *s, int threads) {
    if (dtype < CAST_BF16 || dtype > CAST_F32) return 1;
    const size_t es = cast_esize(dtype);
    const int64_t brows = (n + CAST_BLOCK - 1) / CAST_BLOCK, bcols = (k + CAST_BLOCK - 1) / CAST_BLOCK;
    /* one item: a block row x a block column; two passes over the block (amax, then codes), the
     * second from L2 (a bf16 block is 32 KiB) */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (n * k >= CAST_MIN_PARALLEL)
#else
    (void)threads;
#endif
    for (int64_t item = 0; item < brows * bcols; item++) {
        const int64_t br = item / bcols, bc = item % bcols;
        const int64_t r0 = br * CAST_BLOCK, r1 = r0 + CAST_BLOCK < n ? r0 + CAST_BLOCK : n;
        const int64_t c0 = bc * CAST_BLOCK, width = c0 + CAST_BLOCK < k ? CAST_BLOCK : k - c0;
        float v[CAST_BLOCK] __attribute__((aligned(64)));
        uint32_t top = 0;
        for (int64_t r = r0; r < r1; r++) {
            cast_widen((const char *)x + ((size_t)r * (size_t)ldx + (size_t)c0) * es, dtype, width, v);
            cast_amax(v, width, &top);
        }
        const float amax = cast_floor(top);
        const float factor = cast_factor(amax);
        for (int64_t r = r0; r < r1; r++) {
            cast_widen((const char *)x + ((size_t)r * (size_t)ldx + (size_t)c0) * es, dtype, width, v);
            cast_codes(v, width, factor, q + r * k + c0);
        }
        s[br * bcols + bc] = amax / 448.0f;
    }
    return 0;
}

/* FlashMLA's FP8 KV cache (quantize_mla_kv_cache; hal.ops.mla_fp8_cache), record for record the
 * reference's: per token, the 512 latent channels in 4 tiles of 128, each with a power-of-two
 * scale (ue8m0: the smallest 2^e >= max(amax / 448, 1e-4); NaN stays NaN, inf stays inf), codes
 * e4m3fn(x / scale); then the 4 scales (fp32) and the 64 rope channels as bf16 (rounded to nearest
 * even as torch rounds; a NaN as 0x7fc0, where the reference's vectorised conversion writes 0xffff).
 * Record: 512 code bytes, 16 scale bytes, 128 rope bytes. */
#define KV_LATENT 512
#define KV_ROPE 64
#define KV_TILES (KV_LATENT / CAST_BLOCK)
#define KV_RECORD (KV_LATENT + 4 * KV_TILES + 2 * KV_ROPE)

static inline float kv_ue8m0(float amax) {
    float x = amax / 448.0f;
    x = x < 1e-4f ? 1e-4f : x; /* NaN stays */
    const uint32_t bits = fb_bits(x), exponent = bits & 0x7f800000u;
    if (exponent == 0x7f800000u) return x; /* inf, NaN */
    return fb_float((bits & 0x7fffffu) == 0 ? exponent : exponent + (1u << 23));
}

/* x: tokens of 576 channels (dtype), token t at x + (t / page) * block_stride + (t % page) * token_stride
 * elements, channels contiguous; out: tokens x KV_RECORD bytes. Returns 0, or 1 for a bad dtype. */
int hal_cast_mla_kv_cache(const void *x, int dtype, int64_t blocks, int64_t page, int64_t block_stride, int64_t token_stride,
                          uint8_t *out, int threads) {
    if (dtype < CAST_BF16 || dtype > CAST_F32) return 1;
    const size_t es = cast_esize(dtype);
    const int64_t tokens = blocks * page;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (tokens * (KV_LATENT + KV_ROPE) >= CAST_MIN_PARALLEL)
#else
    (void)threads;
#endif
    for (int64_t t = 0; t < tokens; t++) {
        const char *src = (const char *)x + ((size_t)(t / page) * (size_t)block_stride + (size_t)(t % page) * (size_t)token_stride) * es;
        uint8_t *rec = out + t * KV_RECORD;
        float v[CAST_BLOCK] __attribute__((aligned(64)));
        float scales[KV_TILES];
        for (int tile = 0; tile < KV_TILES; tile++) {
            cast_widen(src + (size_t)tile * CAST_BLOCK * es, dtype, CAST_BLOCK, v);
            uint32_t top = 0;
            cast_amax(v, CAST_BLOCK, &top);
            const float scale = kv_ue8m0(cast_amax_value(top));
            /* x / scale as x * (1 / scale): the scale is a power of two from 2^-13 to 2^120 (its
             * reciprocal exact and normal), inf (x * 0: the same zeros, inf * 0 NaN) or NaN */
            cast_codes(v, CAST_BLOCK, 1.0f / scale, rec + tile * CAST_BLOCK);
            scales[tile] = scale;
        }
        memcpy(rec + KV_LATENT, scales, sizeof scales);
        cast_widen(src + (size_t)KV_LATENT * es, dtype, KV_ROPE, v);
        uint16_t rope[KV_ROPE];
        for (int i = 0; i < KV_ROPE; i++) rope[i] = fb_f32_bf16(v[i]);
        memcpy(rec + KV_LATENT + 4 * KV_TILES, rope, sizeof rope);
    }
    return 0;
}
