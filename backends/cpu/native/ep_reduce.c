/* The owner-side reduction of expert-parallel combine (ep_combine_reduce) for the cpu backend of
 * unihal: out[t] = sum over the rows i of token t, in row order, of w_i * float(row_i), accumulated
 * in fp32 from +0.0 and rounded once (round to nearest even) to the rows' dtype.
 *
 * Built on the user's machine together with the other native kernels (cc -O3 -march=native
 * -std=c11 -ffp-contract=off [-fopenmp] -fPIC -shared) and called through ctypes by
 * hal.backends.cpu.ep. Self-contained (with float_bits.h): the exported symbols are prefixed
 * hal_ep_, all else is static. Plain C written for the compiler to vectorise (widening bf16 is a shift, rounding to
 * bf16 integer arithmetic); -ffp-contract=off keeps the product w * x rounded before it is added,
 * as in the reference.
 *
 * Rows come in segments (the contract's row_segments feature): a combine's own rows stay where the
 * rank computed them and the received ones in the shared receive area; row r of the concatenation
 * is row r - begin(s) of the segment s holding it. The caller gives each token's rows in row order
 * (order[starts[t] .. starts[t+1]), a stable sort of the rows by token), so each token is one pass:
 * every row it sums is read once, its output written once, through an fp32 accumulator of a chunk
 * of channels that stays in L1. Tokens are independent: OpenMP threads take them in blocks.
 *
 * Result: equal to the reference (hal.ops.ep_local.combine_reduce_reference, index_add_ into fp32
 * zeros then one rounding) bit for bit, NaN payloads aside.
 */

#include <stdint.h>
#include <string.h>

#include "float_bits.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { EP_BF16 = 0, EP_F16 = 1, EP_F32 = 2 };
#define EP_CHUNK 1024 /* fp32 channels accumulated at a time: 4 KiB */

static inline uint16_t ep_f32_f16(float f) {
    /* Round to nearest even by letting an fp32 addition do it: scaling |f| up by 2^112 then down by
     * 2^-110 keeps it exact (saturating to inf past fp16's range), and adding 2^(e+13) for e the
     * exponent of f (at least fp16's smallest normal, so subnormals round at their own ulp) leaves
     * exactly fp16's 10 mantissa bits above the rounding point. The same algorithm as torch's
     * fp16 conversion, hence the same results. */
    const uint32_t w = fb_bits(f), twice = w + w, sign = w & 0x80000000u;
    float base = (fb_float(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t bias = twice & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fb_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fb_bits(base);
    const uint32_t magnitude = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((sign >> 16) | (twice > 0xff000000u ? 0x7e00u : magnitude));
}

/* One row's pass over a chunk of n channels, v = w * float(x) (w absent: float(x)):
 *   EP_FIRST acc = 0 + v        EP_MIDDLE acc = acc + v
 *   EP_LAST  dst = round(acc + v)   EP_ONLY dst = round(0 + v)
 * so a token of R rows costs R passes and the output is written by the last one. The additions are
 * the reference's, in its order (its sums start from +0.0: -0.0 rows sum to +0.0). */
enum { EP_FIRST, EP_MIDDLE, EP_LAST, EP_ONLY };

#define EP_PASS(NAME, IN_T, LOAD, OUT_T, STORE)                                                                        \
    static void NAME(int mode, float *restrict acc, const IN_T *restrict x, const float *w, OUT_T *restrict dst, int64_t n) { \
        const float k = w ? *w : 1.0f;                                                                                 \
        if (w) {                                                                                                       \
            switch (mode) {                                                                                            \
            case EP_FIRST: for (int64_t i = 0; i < n; i++) acc[i] = 0.0f + k * LOAD(x[i]); break;                     \
            case EP_MIDDLE: for (int64_t i = 0; i < n; i++) acc[i] += k * LOAD(x[i]); break;                          \
            case EP_LAST: for (int64_t i = 0; i < n; i++) dst[i] = STORE(acc[i] + k * LOAD(x[i])); break;             \
            default: for (int64_t i = 0; i < n; i++) dst[i] = STORE(0.0f + k * LOAD(x[i])); break;                    \
            }                                                                                                          \
        } else {                                                                                                       \
            switch (mode) {                                                                                            \
            case EP_FIRST: for (int64_t i = 0; i < n; i++) acc[i] = 0.0f + LOAD(x[i]); break;                         \
            case EP_MIDDLE: for (int64_t i = 0; i < n; i++) acc[i] += LOAD(x[i]); break;                              \
            case EP_LAST: for (int64_t i = 0; i < n; i++) dst[i] = STORE(acc[i] + LOAD(x[i])); break;                 \
            default: for (int64_t i = 0; i < n; i++) dst[i] = STORE(0.0f + LOAD(x[i])); break;                        \
            }                                                                                                          \
        }                                                                                                              \
    }

#define EP_BF16_LOAD(h) fb_float((uint32_t)(h) << 16)
#define EP_F32_LOAD(f) (f)
#define EP_F32_STORE(f) (f)
EP_PASS(ep_pass_bf16, uint16_t, EP_BF16_LOAD, uint16_t, fb_f32_bf16)
EP_PASS(ep_pass_f16, uint16_t, fb_f16_f32, uint16_t, ep_f32_f16)
EP_PASS(ep_pass_f32, float, EP_F32_LOAD, float, EP_F32_STORE)

/* Returns 0, or 1 for an argument the caller should never pass (bad dtype, a row outside every segment). */
int hal_ep_combine_reduce(int nseg, const void *const *seg_ptr, const int64_t *seg_end, const int64_t *seg_stride, int dtype,
                          int64_t hidden, const int64_t *order, const int64_t *starts, int64_t num_tokens, const float *weights,
                          void *out, int threads) {
    if (dtype < EP_BF16 || dtype > EP_F32 || nseg < 1) return 1;
    const size_t esize = dtype == EP_F32 ? 4 : 2;
    const int64_t total = seg_end[nseg - 1];
    int bad = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads > 0 ? threads : 1) reduction(| : bad)
#else
    (void)threads;
#endif
    for (int64_t t = 0; t < num_tokens; t++) {
        float acc[EP_CHUNK] __attribute__((aligned(64)));
        char *dst = (char *)out + (size_t)t * (size_t)hidden * esize;
        const int64_t r0 = starts[t], r1 = starts[t + 1];
        if (r1 <= r0) {
            memset(dst, 0, (size_t)hidden * esize);
            continue;
        }
        for (int64_t c0 = 0; c0 < hidden; c0 += EP_CHUNK) {
            const int64_t n = hidden - c0 < EP_CHUNK ? hidden - c0 : EP_CHUNK;
            for (int64_t k = r0; k < r1; k++) {
                const int64_t row = order[k];
                if (row < 0 || row >= total) {
                    bad = 1;
                    break;
                }
                int s = 0;
                while (row >= seg_end[s]) s++;
                const int64_t local = row - (s ? seg_end[s - 1] : 0);
                const char *src = (const char *)seg_ptr[s] + ((size_t)local * (size_t)seg_stride[s] + (size_t)c0) * esize;
                const int mode = r1 - r0 == 1 ? EP_ONLY : k == r0 ? EP_FIRST : k == r1 - 1 ? EP_LAST : EP_MIDDLE;
                const float *w = weights ? weights + row : NULL;
                void *to = dst + (size_t)c0 * esize;
                if (dtype == EP_BF16)
                    ep_pass_bf16(mode, acc, (const uint16_t *)src, w, (uint16_t *)to, n);
                else if (dtype == EP_F16)
                    ep_pass_f16(mode, acc, (const uint16_t *)src, w, (uint16_t *)to, n);
                else
                    ep_pass_f32(mode, acc, (const float *)src, w, (float *)to, n);
            }
        }
    }
    return bad;
}
