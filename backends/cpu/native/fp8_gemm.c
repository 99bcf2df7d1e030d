/* FP8 GEMM with fine-grained scales (DeepGEMM numerics) for the cpu backend of unihal.
 *
 * Built on the user's machine by hal.backends.cpu.native (cc -O3 -march=native -std=c11
 * -ffp-contract=off -fopenmp -pthread -shared -fPIC) and called through ctypes. Plain C11; the
 * fast path needs AVX-512 F/BW/VBMI/BF16 (AMD Zen 4 and later, Intel Sapphire Rapids and later),
 * anything else compiles the portable path. -ffp-contract=off matters: the promotion's multiplies
 * and add must round separately, as the reference's do.
 *
 * Contract (hal.ops.gemm_reference): out[m, n] = sum over 128-wide K blocks kb of
 *     (dot_kb(a[m], b[n]) * a_scales[m, kb]) * b_scales[n or n / 128, kb]
 * where dot_kb is an fp32 sum of the products of the exactly decoded e4m3fn values (any order), the
 * promotion is two fp32 multiplies in that order, the blocks are summed in fp32 starting from 0,
 * and out (bfloat16, round to nearest even as torch does, or float32) is written once.
 *
 * Fast path. Every e4m3 value is exact in bf16, and the product of two is exact in fp32 (and is a
 * multiple of 2^-18, so neither products nor partial sums are ever fp32 denormals, which
 * vdpbf16ps would flush): each K block's dot product is a run of vdpbf16ps.
 *   - B is packed per strip of 32 columns, decoded to bf16 in the VNNI pair layout
 *     (for pair P = k/2: 16 columns x [b[n][2P], b[n][2P+1]] per zmm, two zmm per pair). The
 *     fp8 bytes are transposed as 16 x 16 dwords (4 shuffle stages), then decoded with two
 *     128-entry byte table lookups (vpermi2b: low and high byte of the bf16) and interleaved.
 *   - A is decoded to bf16 pairs, stored per strip of mr <= 12 rows as [P][mr] dwords, so the
 *     microkernel broadcasts one dword per row and pair.
 *   - The microkernel keeps mr x 32 fp32 partial sums in registers over one K block (64 pairs),
 *     then promotes them into the mr x 32 fp32 accumulator tile: (p * sa) * sb, then +.
 *   - 9 to 16 rows take another kernel whose lanes are rows (see "rows in lanes"): it decodes B
 *     without the transpose, which at so few rows costs as much as the products; 17 to 48 rows
 *     go through it 16 rows at a time (the last 1-16 rows by their own kernel).
 *   - Decode batches stream B instead (each thread a contiguous run of its rows, decoded in place):
 *     one row takes dot products along K ("rows as dot products"), 2-8 rows rotate A's rows
 *     through groups of lanes ("rows in lane groups").
 * Work items are (32-column strip, group of row strips), taken dynamically by OpenMP threads
 * (torch's, see parallel_for), or by a small pthread pool where the compiler has no OpenMP.
 */

#define _POSIX_C_SOURCE 200809L /* clock_gettime, posix_memalign under -std=c11 */

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
#define HAL_FAST 1
#include <immintrin.h>
#else
#define HAL_FAST 0
#endif

#define BLK 128       /* K block of the scales */
#define NR 32         /* columns per strip */
#define MR 12         /* most rows per register tile */
#define PAIRS (BLK / 2)
#define GROUP_ROWS 768 /* most rows of A per work item (bounds the accumulator scratch) */
#define A_PACK_BYTES (16L << 20) /* decoded A per super-chunk of rows */
#define B_PACK_BLOCKS 64 /* most K blocks of a packed B strip (512 KiB) */
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 256 /* how far ahead along each row of B the packing fetches */
#endif

/* ------------------------------------------------------------------------------------------ */
/* e4m3fn decoding                                                                            */

static uint16_t lut_bf16[256];             /* bf16 bits of every code (NaN: 0x7fc0, sign kept) */
static float lut_f32[256];
static uint8_t lut_lo[128], lut_hi[128];   /* bytes of the bf16 of the code's 7 low bits */
static pthread_once_t lut_once = PTHREAD_ONCE_INIT;

static void lut_init(void) {
    for (int code = 0; code < 256; code++) {
        int sign = code >> 7, e = (code >> 3) & 15, m = code & 7;
        float v;
        if (e == 15 && m == 7)
            v = NAN;
        else if (e == 0)
            v = ldexpf((float)m, -9);
        else
            v = ldexpf((float)(8 + m), e - 10);
        if (sign) v = -v;
        uint32_t bits;
        memcpy(&bits, &v, 4);
        if (v != v) bits = 0x7fc00000u | ((uint32_t)sign << 31);
        lut_f32[code] = v;
        lut_bf16[code] = (uint16_t)(bits >> 16); /* exact: e4m3 values need 4 significant bits */
        if (code < 128) {
            lut_lo[code] = (uint8_t)(bits >> 16);
            lut_hi[code] = (uint8_t)(bits >> 24);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* threads: OpenMP (torch's threads), else a small pthread pool                               */

#include "parallel.h"

/* ------------------------------------------------------------------------------------------ */
/* per-thread scratch                                                                         */

static __thread void *scratch_ptr;
static __thread size_t scratch_cap;

static void *scratch(size_t bytes) {
    if (bytes > scratch_cap) {
        free(scratch_ptr);
        scratch_ptr = NULL;
        scratch_cap = 0;
        size_t cap = (bytes + 4095) & ~(size_t)4095;
        if (posix_memalign(&scratch_ptr, 64, cap) != 0) {
            scratch_ptr = NULL;
            return NULL;
        }
        scratch_cap = cap;
    }
    return scratch_ptr;
}

/* ------------------------------------------------------------------------------------------ */
/* problem description                                                                        */

typedef struct {
    const uint8_t *a; long lda;  /* fp8 [M, K], row stride in bytes */
    const float *as;             /* [M, KB] */
    const uint8_t *b; long ldb;  /* fp8 [N, K] */
    const float *bs; int b_per_token; /* [N or ceil(N/128), KB] */
    void *out; long ldo; int out_f32;
    long M, N, K, KB;
    /* current super-chunk of rows [m0, m0 + mc) */
    long m0, mc;
    int nstrips;                 /* row strips of the super-chunk */
    long *strip_r0;              /* first row of each strip (relative to m0), nstrips + 1 entries */
    int ngroups;                 /* groups of consecutive strips */
    int *group_s0;               /* first strip of each group, ngroups + 1 entries */
    long ncs;                    /* column strips */
    void *apack;                 /* decoded A of the super-chunk (strip s at strip_r0[s] * K elements) */
    int failed;                  /* a worker could not get scratch memory */
    long pf_rows, pf_rest;       /* DOT_PREFETCH as whole rows of B (K bytes each) and the rest (slot_ahead) */
} problem;

static float col_scale(const problem *p, long n, long kb) {
    long row = p->b_per_token ? n : n / BLK;
    return p->bs[row * p->KB + kb];
}

static void scale_strip(const problem *p, long n0, float *cs) {
    /* cs[kb][32]: the scale of each column of the strip in each K block (0 past N). */
    for (long kb = 0; kb < p->KB; kb++)
        for (int c = 0; c < NR; c++) cs[kb * NR + c] = n0 + c < p->N ? col_scale(p, n0 + c, kb) : 0.0f;
}

#if !HAL_FAST
static inline uint16_t f32_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if (v != v) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif

#if !HAL_FAST
static void write_rows_scalar(const problem *p, long row0, int rows, long n0, const float *C) {
    long cols = p->N - n0 < NR ? p->N - n0 : NR;
    for (int r = 0; r < rows; r++) {
        if (p->out_f32) {
            float *o = (float *)p->out + (row0 + r) * p->ldo + n0;
            for (long c = 0; c < cols; c++) o[c] = C[r * NR + c];
        } else {
            uint16_t *o = (uint16_t *)p->out + (row0 + r) * p->ldo + n0;
            for (long c = 0; c < cols; c++) o[c] = f32_to_bf16(C[r * NR + c]);
        }
    }
}
#endif

#if HAL_FAST
/* ------------------------------------------------------------------------------------------ */
/* fast path                                                                                  */

typedef struct { __m512i lo0, lo1, hi0, hi1, sign, ilv0, ilv1; } decoder;

static void decoder_init(decoder *d) {
    d->lo0 = _mm512_loadu_si512(lut_lo);
    d->lo1 = _mm512_loadu_si512(lut_lo + 64);
    d->hi0 = _mm512_loadu_si512(lut_hi);
    d->hi1 = _mm512_loadu_si512(lut_hi + 64);
    d->sign = _mm512_set1_epi8((char)0x80);
    /* Dword j of the transposed fp8 holds row j's bytes k..k+3: pair (k, k+1) -> ilv0, (k+2, k+3) -> ilv1,
     * each dword [lo(x0), hi(x0), lo(x1), hi(x1)]; index >= 64 selects from the high bytes. */
    uint8_t i0[64], i1[64];
    for (int j = 0; j < 16; j++) {
        i0[4 * j + 0] = (uint8_t)(4 * j);     i0[4 * j + 1] = (uint8_t)(64 + 4 * j);
        i0[4 * j + 2] = (uint8_t)(4 * j + 1); i0[4 * j + 3] = (uint8_t)(64 + 4 * j + 1);
        i1[4 * j + 0] = (uint8_t)(4 * j + 2); i1[4 * j + 1] = (uint8_t)(64 + 4 * j + 2);
        i1[4 * j + 2] = (uint8_t)(4 * j + 3); i1[4 * j + 3] = (uint8_t)(64 + 4 * j + 3);
    }
    d->ilv0 = _mm512_loadu_si512(i0);
    d->ilv1 = _mm512_loadu_si512(i1);
}

/* Pack columns [n0, n0 + 32) x K blocks [kb0, kb1) of B into dst: pair P (relative to kb0 * 64)
 * at dst + P * 32 dwords, columns 0..15 then 16..31; columns past N are zeros. */
static void pack_b(const problem *p, const decoder *d, long n0, long kb0, long kb1, uint32_t *dst) {
    for (int half = 0; half < 2; half++) {
        long first = n0 + 16 * half;
        long valid = p->N - first;
        if (valid > 16) valid = 16;
        if (valid <= 0) {
            for (long pp = 0; pp < (kb1 - kb0) * PAIRS; pp++) _mm512_store_si512(dst + pp * NR + 16 * half, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *rows = p->b + first * p->ldb;
        for (long k0 = kb0 * BLK; k0 < kb1 * BLK; k0 += 64) {
            __m512i r[16], t[16];
            /* 16 rows read side by side defeat the hardware prefetchers: fetch ahead along each row
             * (past the row's end it is the next row's start, or harmless). */
            for (int j = 0; j < 16; j++) {
                if (j < valid) {
                    _mm_prefetch((const char *)(rows + j * p->ldb + k0 + PREFETCH_BYTES), PREFETCH_HINT);
                    r[j] = _mm512_loadu_si512(rows + j * p->ldb + k0);
                } else {
                    r[j] = _mm512_setzero_si512();
                }
            }
            for (int j = 0; j < 16; j += 2) {
                t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
                t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
            }
            for (int g = 0; g < 16; g += 4) {
                r[g + 0] = _mm512_unpacklo_epi64(t[g + 0], t[g + 2]);
                r[g + 1] = _mm512_unpackhi_epi64(t[g + 0], t[g + 2]);
                r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
                r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
            }
            /* r[4g + s] lane L: dword 4L + s of rows 4g..4g+3 */
            for (int s = 0; s < 4; s++) {
                __m512i v0 = _mm512_shuffle_i32x4(r[s], r[4 + s], 0x44);
                __m512i v1 = _mm512_shuffle_i32x4(r[s], r[4 + s], 0xEE);
                __m512i v2 = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0x44);
                __m512i v3 = _mm512_shuffle_i32x4(r[8 + s], r[12 + s], 0xEE);
                t[s] = _mm512_shuffle_i32x4(v0, v2, 0x88);
                t[4 + s] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
                t[8 + s] = _mm512_shuffle_i32x4(v1, v3, 0x88);
                t[12 + s] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
            }
            /* t[q]: dword q (bytes k0 + 4q .. + 3) of rows 0..15 */
            uint32_t *o = dst + ((k0 - kb0 * BLK) / 2) * NR + 16 * half;
            for (int q = 0; q < 16; q++) {
                __m512i x = t[q];
                __m512i lo = _mm512_permutex2var_epi8(d->lo0, x, d->lo1);
                __m512i hi = _mm512_permutex2var_epi8(d->hi0, x, d->hi1);
                hi = _mm512_ternarylogic_epi32(hi, x, d->sign, 0xF8); /* hi | (x & 0x80) */
                _mm512_store_si512(o + (2 * q) * NR, _mm512_permutex2var_epi8(lo, d->ilv0, hi));
                _mm512_store_si512(o + (2 * q + 1) * NR, _mm512_permutex2var_epi8(lo, d->ilv1, hi));
            }
        }
    }
}

/* Register tile: MRT rows x 32 columns over K blocks [kb0, kb1); a: the strip's packed A
 * ([P][MRT] dwords over all of K), b: packed B whose pair 0 is K block kb0's first, as_: the
 * strip's first row of a_scales, C: the fp32 accumulator tile [MRT][32]. */
static inline __attribute__((always_inline)) void tile(const int MRT, const uint32_t *a, const uint32_t *b, long kb0, long kb1,
                                                         const float *as_, long KB, const float *cs, float *C) {
    const int SETS = MRT == 1 ? 4 : (MRT == 2 ? 2 : 1);
    for (long kb = kb0; kb < kb1; kb++) {
        __m512 acc[SETS][MRT][2];
#pragma GCC unroll 4
        for (int s = 0; s < SETS; s++)
#pragma GCC unroll 12
            for (int r = 0; r < MRT; r++) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
        const uint32_t *ap = a + kb * PAIRS * MRT;
        const uint32_t *bp = b + (kb - kb0) * PAIRS * NR;
        for (int pp = 0; pp < PAIRS; pp += SETS) {
#pragma GCC unroll 4
            for (int s = 0; s < SETS; s++) {
                __m512bh b0 = (__m512bh)_mm512_load_si512(bp + (pp + s) * NR);
                __m512bh b1 = (__m512bh)_mm512_load_si512(bp + (pp + s) * NR + 16);
#pragma GCC unroll 12
                for (int r = 0; r < MRT; r++) {
                    __m512bh av = (__m512bh)_mm512_set1_epi32((int)ap[(pp + s) * MRT + r]);
                    acc[s][r][0] = _mm512_dpbf16_ps(acc[s][r][0], av, b0);
                    acc[s][r][1] = _mm512_dpbf16_ps(acc[s][r][1], av, b1);
                }
            }
        }
        __m512 s0 = _mm512_loadu_ps(cs + kb * NR), s1 = _mm512_loadu_ps(cs + kb * NR + 16);
#pragma GCC unroll 12
        for (int r = 0; r < MRT; r++) {
            __m512 p0 = acc[0][r][0], p1 = acc[0][r][1];
#pragma GCC unroll 4
            for (int s = 1; s < SETS; s++) {
                p0 = _mm512_add_ps(p0, acc[s][r][0]);
                p1 = _mm512_add_ps(p1, acc[s][r][1]);
            }
            __m512 sa = _mm512_set1_ps(as_[r * KB + kb]);
            p0 = _mm512_mul_ps(_mm512_mul_ps(p0, sa), s0);
            p1 = _mm512_mul_ps(_mm512_mul_ps(p1, sa), s1);
            _mm512_storeu_ps(C + r * NR, _mm512_add_ps(_mm512_loadu_ps(C + r * NR), p0));
            _mm512_storeu_ps(C + r * NR + 16, _mm512_add_ps(_mm512_loadu_ps(C + r * NR + 16), p1));
        }
    }
}

#define TILE_FN(n) \
    static void tile_##n(const uint32_t *a, const uint32_t *b, long kb0, long kb1, const float *as_, long KB, const float *cs, float *C) { \
        tile(n, a, b, kb0, kb1, as_, KB, cs, C); \
    }
TILE_FN(1) TILE_FN(2) TILE_FN(3) TILE_FN(4) TILE_FN(5) TILE_FN(6)
TILE_FN(7) TILE_FN(8) TILE_FN(9) TILE_FN(10) TILE_FN(11) TILE_FN(12)

typedef void (*tile_fn)(const uint32_t *, const uint32_t *, long, long, const float *, long, const float *, float *);
static const tile_fn tiles[MR + 1] = {NULL, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
                                      tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

/* Rows [row0, row0 + rows) x columns [n0, n0 + min(width, N - n0)) of out from C [rows][32] fp32. */
static void write_rows(const problem *p, long row0, int rows, long n0, long width, const float *C) {
    long cols = p->N - n0 < width ? p->N - n0 : width;
    __mmask16 m0 = (__mmask16)(cols >= 16 ? 0xFFFF : ((1u << cols) - 1));
    __mmask16 m1 = (__mmask16)(cols >= 32 ? 0xFFFF : (cols <= 16 ? 0 : ((1u << (cols - 16)) - 1)));
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7fc0);
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < 2; h++) {
            __mmask16 m = h ? m1 : m0;
            if (!m) continue;
            __m512 v = _mm512_loadu_ps(C + r * NR + 16 * h);
            if (p->out_f32) {
                _mm512_mask_storeu_ps((float *)p->out + (row0 + r) * p->ldo + n0 + 16 * h, m, v);
            } else {
                __m512i u = _mm512_castps_si512(v);
                __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
                rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
                _mm256_mask_storeu_epi16((uint16_t *)p->out + (row0 + r) * p->ldo + n0 + 16 * h, m, _mm512_cvtepi32_epi16(rounded));
            }
        }
    }
}

/* The lines of out under rows [row0, row0 + rows) x columns [n0, n0 + width) fetched for writing
 * (prefetchw where the CPU has it). A strip's 32 columns are one or two 64-byte lines per row (one
 * for bf16 rows aligned to 64 bytes), and with out's rows a power of two apart (n = 32768 bf16:
 * 64 KiB) all of an item's lines fall in one L1 set and two L2 sets: written all at the item's end (up to 768 rows), each store missed and
 * evicted the lines before it. Measured against that (interleaved, 2 threads, weights from memory,
 * GFLOP/s): K = 512, n = 32768: m = 64 541 -> 597, 128 1.12x, 256 692 -> 781, 1024 713 -> 791;
 * K = 2048 1.00-1.04x; K = 7168 alike. With out's rows 64 elements apart (no misses, wrong sums)
 * the old form ran 1.2x faster at m = 128, K = 512; this one 1.02x. */
static void prefetch_out(const problem *p, long row0, long rows, long n0, long width) {
    const long cols = p->N - n0 < width ? p->N - n0 : width;
    const size_t es = p->out_f32 ? 4 : 2;
    for (long r = 0; r < rows; r++) {
        const char *first = (const char *)p->out + ((row0 + r) * p->ldo + n0) * es;
        for (uintptr_t at = (uintptr_t)first & ~(uintptr_t)63; at < (uintptr_t)first + cols * es; at += 64) __builtin_prefetch((const void *)at, 1, 3);
    }
}

/* A strip: rows [r0, r0 + mr) of the super-chunk -> [P][mr] dwords of bf16 pairs. */
static void pack_a_strip(const problem *p, long r0, int mr, uint32_t *dst) {
    long P = p->K / 2;
    for (int r = 0; r < mr; r++) {
        const uint8_t *row = p->a + (p->m0 + r0 + r) * p->lda;
        for (long pp = 0; pp < P; pp++)
            dst[pp * mr + r] = (uint32_t)lut_bf16[row[2 * pp]] | ((uint32_t)lut_bf16[row[2 * pp + 1]] << 16);
    }
}

static void item_pack_a(void *ctx, long s, int tid) {
    (void)tid;
    problem *p = ctx;
    long r0 = p->strip_r0[s];
    pack_a_strip(p, r0, (int)(p->strip_r0[s + 1] - r0), (uint32_t *)p->apack + r0 * (p->K / 2));
}

static void item_gemm(void *ctx, long item, int tid) {
    (void)tid;
    problem *p = ctx;
    long strip = item % p->ncs, group = item / p->ncs;
    long n0 = strip * NR;
    int s0 = p->group_s0[group], s1 = p->group_s0[group + 1];
    long row0 = p->strip_r0[s0], rows = p->strip_r0[s1] - row0;
    /* few rows: pack one K block at a time (it stays in L1); many: up to 64 blocks, reused by every strip */
    long kbc = s1 - s0 <= 2 ? 1 : (p->KB < B_PACK_BLOCKS ? p->KB : B_PACK_BLOCKS);
    size_t c_bytes = (size_t)rows * NR * 4, cs_bytes = (size_t)p->KB * NR * 4, b_bytes = (size_t)kbc * PAIRS * NR * 4;
    char *mem = scratch(b_bytes + c_bytes + cs_bytes);
    if (!mem) {
        __atomic_store_n(&p->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    uint32_t *bpack = (uint32_t *)mem;
    float *C = (float *)(mem + b_bytes), *cs = (float *)(mem + b_bytes + c_bytes);
    decoder d;
    decoder_init(&d);
    scale_strip(p, n0, cs);
    memset(C, 0, c_bytes);
    for (long kb0 = 0; kb0 < p->KB; kb0 += kbc) {
        long kb1 = kb0 + kbc < p->KB ? kb0 + kbc : p->KB;
        const int last = kb1 == p->KB;
        /* In the last K chunk each row strip's sums are final after its tile: written right away,
         * the next strip's lines of out fetched for writing meanwhile (see prefetch_out). */
        if (last) prefetch_out(p, p->m0 + row0, p->strip_r0[s0 + 1] - row0, n0, NR);
        pack_b(p, &d, n0, kb0, kb1, bpack);
        for (int s = s0; s < s1; s++) {
            long r0 = p->strip_r0[s];
            int mr = (int)(p->strip_r0[s + 1] - r0);
            if (last && s + 1 < s1) prefetch_out(p, p->m0 + p->strip_r0[s + 1], p->strip_r0[s + 2] - p->strip_r0[s + 1], n0, NR);
            tiles[mr]((const uint32_t *)p->apack + r0 * (p->K / 2), bpack, kb0, kb1, p->as + (p->m0 + r0) * p->KB, p->KB, cs,
                      C + (r0 - row0) * NR);
            if (last) write_rows(p, p->m0 + r0, mr, n0, NR, C + (r0 - row0) * NR);
        }
    }
}

/* ---- what the kernels that stream B (rows in lanes, dot products, lane groups) share ------- */
#ifndef STREAM_HINT
#define STREAM_HINT _MM_HINT_T1 /* into L2: measured 1.2-1.4x T0 at 1-2 rows, T2 alike, NTA as T0 (likely: T0
                                  * prefetches 4 streams deep wait for L1's few miss buffers, L2 has more) */
#endif
#ifndef DOT_PREFETCH
#define DOT_PREFETCH 4096 /* bytes ahead in a column slot's stream (slot_ahead); 3072-8192 measured alike */
#endif

/* out[r][col] = v: float32, or bfloat16 rounded to nearest even as torch rounds (NaN: 0x7fc0). */
static inline void put_out(const problem *p, long r, long col, float v) {
    if (p->out_f32) {
        ((float *)p->out)[r * p->ldo + col] = v;
    } else {
        uint32_t u;
        memcpy(&u, &v, 4);
        ((uint16_t *)p->out)[r * p->ldo + col] = v != v ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* Each lane of v as out's bfloat16 bits (in its low 16 bits), rounded as put_out rounds: to nearest
 * even, NaN as 0x7fc0. */
static inline __attribute__((always_inline)) __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

/* Columns per work item of the streaming kernels: consecutive columns, a contiguous run of B each,
 * about 8 items per thread (balance on a shared machine), whole groups of `group` columns (the
 * kernel's columns side by side). */
static long column_run(const problem *p, int nthreads, long group) {
    long per = (p->N + 8L * nthreads - 1) / (8L * nthreads);
    return (per + group - 1) / group * group;
}

/* The end of the run of columns that starts at n0: per columns, or up to N. */
static long column_run_end(const problem *p, long n0, long per) { return n0 + per < p->N ? n0 + per : p->N; }

/* The address DOT_PREFETCH bytes ahead in the stream of a column slot: a kernel that reads columns
 * [n, n + ncol) side by side reads column n + c at offset `at`, and that slot goes on with columns
 * n + c + ncol, n + c + 2 ncol, ... (K bytes each). Plain `src + DOT_PREFETCH` runs into the next
 * row of B, which with ncol > 1 is a neighbouring slot's row, being read anyway: at K = 2048 three
 * prefetches in four were wasted. Measured (interleaved, one process, weights from memory):
 * 1.1-1.4x at 1-4 rows, K 1536-7168. When DOT_PREFETCH spans more than one row (K < 4096), the
 * address is the slot's own row that many rows on (an earlier form prefetched the rows right after
 * the next one, in other slots but also ahead: measured alike, 0.9-1.1x). pf_rows and pf_rest
 * (DOT_PREFETCH / K and % K, set once per call) spare a division per chunk. A prefetch never
 * faults, so an address past B's end is harmless. */
static inline const char *slot_ahead(const problem *p, long n, int ncol, long at) {
    long rows = p->pf_rows, ahead = at + p->pf_rest;
    if (ahead >= p->K) {
        ahead -= p->K;
        rows++;
    }
    return (const char *)(p->b + (n + rows * ncol) * p->ldb + ahead);
}

/* One 64-byte chunk of fp8 decoded to bf16 pairs: two table lookups (low and high byte of each
 * bf16), the sign bit put back, then an in-lane byte interleave, which leaves the pairs in the
 * order 0-3, 8-11, 16-19, 24-27 (u0) and 4-7, 12-15, 20-23, 28-31 (u1). Every kernel that streams
 * B decodes A with it too, so the pairs match lane for lane. */
static inline __attribute__((always_inline)) void decode64(const decoder *d, __m512i x, __m512i *u0, __m512i *u1) {
    __m512i lo = _mm512_permutex2var_epi8(d->lo0, x, d->lo1);
    __m512i hi = _mm512_permutex2var_epi8(d->hi0, x, d->hi1);
    hi = _mm512_ternarylogic_epi32(hi, x, d->sign, 0xF8); /* hi | (x & 0x80) */
    *u0 = _mm512_unpacklo_epi8(lo, hi);
    *u1 = _mm512_unpackhi_epi8(lo, hi);
}

/* A's rows decoded as decode64 leaves each 64-byte chunk: [M][K/64][2] zmm at dst. */
static void decode_rows(const problem *p, __m512i *dst) {
    const long chunks = p->K / 64;
    decoder d;
    decoder_init(&d);
    for (long r = 0; r < p->M; r++)
        for (long c = 0; c < chunks; c++) {
            __m512i u0, u1;
            decode64(&d, _mm512_loadu_si512(p->a + r * p->lda + 64 * c), &u0, &u1);
            _mm512_store_si512(dst + (r * chunks + c) * 2, u0);
            _mm512_store_si512(dst + (r * chunks + c) * 2 + 1, u1);
        }
}

/* ---- rows in lanes: RL_MIN_ROWS <= M <= 16 ----------------------------------------------------------
 * With few rows the column-lane tiles above spend as much time transposing B as multiplying. Here
 * the lanes of an accumulator are (row, pair parity): 8 rows x 2 K pairs, two accumulators per
 * column for 16 rows. B is decoded row-major by decode64 (no transpose) into a small scratch, from
 * which each vpbroadcastq puts two bf16 pairs of one column in every lane pair and serves both
 * accumulators; A is packed in decode64's pair order, so lane parity t of step s multiplies
 * position 2s + t of the decoded block on both sides. Same vdpbf16ps count as column-lane tiles of
 * 16 rows. At the end of each K block the parities are added and the two accumulators of a column
 * folded into one vector (lane 2r: row r, lane 2r + 1: row 8 + r), then promoted.
 * Besides the products, the cost is B's decode (a load, two table lookups, the sign, two unpacks
 * and two stores per 64 bytes): done as a burst before each K block's products it left the
 * product pipes idle (hot, one thread: 62% of the vdpbf16ps peak; 1.4x with the decode taken out).
 * So the next K block is decoded into a second buffer while this one is multiplied, a chunk every
 * second step, and the last block of a group decodes the next group's first: 78-84% of the peak.
 * Measured against the kernel before (burst decode with vpermt2b interleaves, 12 columns whose
 * promoted sums spilled, A packed by scalar lookups, out written element by element), interleaved
 * in one process, weights from memory, 16 rows, 2 threads: 1.2-1.3x at the six DeepSeek-V3 shapes,
 * 23.7-26.7 GB/s of weights. */
#define NG 8 /* columns side by side: 16 accumulators + 8 promoted sums, none spilled (12 measured 0.9-1.0x) */
_Static_assert(PAIRS / 2 == 4 * NG, "rl_group decodes a 64-byte chunk every second of a K block's 32 steps: 2 chunks x NG columns");
#ifndef PASS_MAX_ROWS
#define PASS_MAX_ROWS 48 /* 17 to 48 rows: passes of 16 rows (see hal_fp8_gemm). Against the column-lane tiles,
                          * interleaved, 2 threads, weights from memory, GB/s of weights: 17-32 rows 1.02-1.48x
                          * (three shapes), 48 rows 1.01-1.34x (all six DeepSeek-V3 shapes); 64 rows 0.94-1.25x
                          * (the tiles ahead at K 7168-16384), 96 rows 0.97-1.08x: the tiles from 49 rows */
#endif
#ifndef RL_MIN_ROWS
#define RL_MIN_ROWS 9 /* from 9 rows: against the column-lane tiles (which compute only the rows there are),
                         * interleaved, 2 threads, weights from memory: 10-14 rows 1.06-1.45x at n 2112/7168;
                         * 9 rows 0.83-0.95x at (2112, 7168) and (4096, 7168), 1.06-1.42x at the other four */
#endif

typedef struct {
    const problem *p;
    const uint64_t *apack; /* [K/4][16] qwords: step s of K block kb, row r = decoded positions 2s, 2s + 1 of row r's block */
    const float *as16;     /* [KB][16]: the scale of lane 2r -> row r, lane 2r + 1 -> row 8 + r (0 past M) */
    long cols_per_item;    /* a multiple of NG */
} rl_problem;

/* Chunk h (64 bytes) of K block kb of column n0 + c decoded into blk (one K block of NG columns,
 * [NG][64] dwords in decode64 order); the slot's stream prefetched DOT_PREFETCH bytes ahead. */
static inline __attribute__((always_inline)) void rl_decode(const problem *p, const decoder *d, uint32_t *blk, long n0, int c, long kb, int h) {
    _mm_prefetch(slot_ahead(p, n0 + c, NG, kb * BLK + 64 * h), STREAM_HINT);
    __m512i u0, u1;
    decode64(d, _mm512_loadu_si512(p->b + (n0 + c) * p->ldb + kb * BLK + 64 * h), &u0, &u1);
    _mm512_store_si512(blk + c * PAIRS + 32 * h, u0);
    _mm512_store_si512(blk + c * PAIRS + 32 * h + 16, u1);
}

/* Columns [n0, n0 + cols) of out, cols <= NG. bdec: two K blocks of decoded B ([2][NG][64] dwords);
 * block kb of this group is in half (phase + kb) & 1, block 0 decoded already. While block kb is
 * multiplied, the next block is decoded into the other half, one 64-byte chunk every second step,
 * so decoding and products share every stretch of the loop; during the last block, block 0 of the
 * next group (columns [n0 + NG, n0 + NG + next_cols), next_cols 0: none). Columns past cols hold
 * zeros or whatever an earlier group decoded there: their sums are never written. C: [NG][16]
 * floats of scratch. */
static void rl_group(const rl_problem *q, const decoder *d, uint32_t *bdec, float *C, long n0, int cols, int phase, int next_cols) {
    const problem *p = q->p;
    const __mmask16 odd = 0xAAAA;
    __m512 acc[NG][2], Cv[NG];
    for (int c = 0; c < NG; c++) Cv[c] = _mm512_setzero_ps();
    for (long kb = 0; kb < p->KB; kb++) {
        const uint32_t *cur = bdec + ((phase + kb) & 1) * NG * PAIRS;
        uint32_t *next = bdec + ((phase + kb + 1) & 1) * NG * PAIRS;
        const int last = kb + 1 == p->KB;
        const long nn = last ? n0 + NG : n0, nkb = last ? 0 : kb + 1;
        const int ncols = last ? next_cols : cols;
#pragma GCC unroll 8
        for (int c = 0; c < NG; c++) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
        const uint64_t *ap = q->apack + kb * (PAIRS / 2) * 16;
        for (int st = 0; st < PAIRS / 2; st++) {
            if ((st & 1) == 0 && st / 4 < ncols) rl_decode(p, d, next, nn, st / 4, nkb, (st / 2) & 1);
            __m512bh a0 = (__m512bh)_mm512_load_si512(ap + st * 16), a1 = (__m512bh)_mm512_load_si512(ap + st * 16 + 8);
#pragma GCC unroll 8
            for (int c = 0; c < NG; c++) {
                long long two;
                memcpy(&two, cur + c * PAIRS + 2 * st, 8);
                __m512bh bv = (__m512bh)_mm512_set1_epi64(two);
                acc[c][0] = _mm512_dpbf16_ps(acc[c][0], a0, bv);
                acc[c][1] = _mm512_dpbf16_ps(acc[c][1], a1, bv);
            }
        }
        __m512 sa = _mm512_load_ps(q->as16 + kb * 16);
#pragma GCC unroll 8
        for (int c = 0; c < NG; c++) {
            /* x + swap(y): lane 2r gets rows r's two parities (acc[c][0]), lane 2r + 1 row 8 + r's (acc[c][1]) */
            __m512 x = _mm512_mask_blend_ps(odd, acc[c][0], acc[c][1]);
            __m512 y = _mm512_mask_blend_ps(odd, acc[c][1], acc[c][0]);
            __m512 v = _mm512_add_ps(x, _mm512_permute_ps(y, 0xB1));
            __m512 sb = _mm512_set1_ps(c < cols ? col_scale(p, n0 + c, kb) : 0.0f);
            Cv[c] = _mm512_add_ps(Cv[c], _mm512_mul_ps(_mm512_mul_ps(v, sa), sb));
        }
    }
    const __mmask8 valid = (__mmask8)((1u << cols) - 1);
    if (p->out_f32) {
        /* rows r and 8 + r are lanes 2r and 2r + 1 of every Cv[c]: one gather collects both rows' columns */
        for (int c = 0; c < NG; c++) _mm512_store_ps(C + c * 16, Cv[c]);
        const __m512i at = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 1, 17, 33, 49, 65, 81, 97, 113);
        for (long r = 0; r < 8 && r < p->M; r++) {
            __m512 v = _mm512_i32gather_ps(at, C + 2 * r, 4);
            float *dst = (float *)p->out + r * p->ldo + n0;
            _mm256_mask_storeu_ps(dst, valid, _mm512_castps512_ps256(v));
            if (8 + r < p->M) _mm256_mask_storeu_ps(dst + 8 * p->ldo, valid, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        }
        return;
    }
    /* bfloat16 (put_out's rounding): columns 2k, 2k + 1 in one dword per lane, then a 4 x 16 dword
     * transpose leaves lane l's 8 columns (16 bytes, one row of out) in 128-bit lane l / 4 of t[l % 4] */
    __m512i w[4], u[4], t[4];
    for (int k = 0; k < 4; k++) w[k] = _mm512_or_si512(bf16_bits(Cv[2 * k]), _mm512_slli_epi32(bf16_bits(Cv[2 * k + 1]), 16));
    u[0] = _mm512_unpacklo_epi32(w[0], w[1]); u[1] = _mm512_unpackhi_epi32(w[0], w[1]);
    u[2] = _mm512_unpacklo_epi32(w[2], w[3]); u[3] = _mm512_unpackhi_epi32(w[2], w[3]);
    t[0] = _mm512_unpacklo_epi64(u[0], u[2]); t[1] = _mm512_unpackhi_epi64(u[0], u[2]);
    t[2] = _mm512_unpacklo_epi64(u[1], u[3]); t[3] = _mm512_unpackhi_epi64(u[1], u[3]);
    __m128i rowv[16];
    for (int j = 0; j < 4; j++) {
        rowv[j] = _mm512_castsi512_si128(t[j]);
        rowv[4 + j] = _mm512_extracti32x4_epi32(t[j], 1);
        rowv[8 + j] = _mm512_extracti32x4_epi32(t[j], 2);
        rowv[12 + j] = _mm512_extracti32x4_epi32(t[j], 3);
    }
    for (int l = 0; l < 16; l++) {
        long r = l % 2 ? 8 + l / 2 : l / 2;
        if (r < p->M) _mm_mask_storeu_epi16((uint16_t *)p->out + r * p->ldo + n0, valid, rowv[l]);
    }
}

/* A run of cols_per_item columns (whole groups of NG but the last), one group after another: a
 * column slot's stream goes on in the next group, where slot_ahead prefetches. */
static void item_rl(void *ctx, long item, int tid) {
    (void)tid;
    const rl_problem *q = ctx;
    const problem *p = q->p;
    /* bdec: [2][NG][64] dwords (two K blocks of each column, decode64 order), C: [NG][16] fp32 */
    char *mem = scratch(2 * NG * PAIRS * 4 + NG * 16 * 4);
    if (!mem) {
        __atomic_store_n((int *)&p->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    uint32_t *bdec = (uint32_t *)mem;
    float *C = (float *)(mem + 2 * NG * PAIRS * 4);
    decoder d;
    decoder_init(&d);
    long n0 = item * q->cols_per_item, n1 = column_run_end(p, n0, q->cols_per_item);
    int phase = 0;
    memset(bdec, 0, 2 * NG * PAIRS * 4); /* columns a partial group never decodes: zeros, never uninitialised memory */
    for (int c = 0; c < NG && n0 + c < n1; c++)
        for (int h = 0; h < 2; h++) rl_decode(p, &d, bdec, n0, c, 0, h);
    for (long n = n0; n < n1; n += NG) {
        int cols = (int)(n1 - n < NG ? n1 - n : NG);
        long rest = n1 - n - NG;
        rl_group(q, &d, bdec, C, n, cols, phase, (int)(rest <= 0 ? 0 : rest < NG ? rest : NG));
        phase = (int)((phase + p->KB) & 1);
    }
}

/* RL_MIN_ROWS <= M <= 16 (K a multiple of 128): returns 0, or ENOMEM. */
static int gemm_rows_in_lanes(problem *p, int nthreads) {
    const long steps = p->K / 4; /* 4 K values (a qword of bf16) per step */
    uint64_t *apack = NULL, *rows = NULL;
    float *as16 = NULL;
    if (posix_memalign((void **)&apack, 64, (size_t)steps * 128) != 0) return ENOMEM;
    if (posix_memalign((void **)&rows, 64, (size_t)p->M * steps * 8) != 0 ||
        posix_memalign((void **)&as16, 64, (size_t)p->KB * 64) != 0) {
        free(apack);
        free(rows);
        return ENOMEM;
    }
    /* rows: [M][K/4] qwords, each K block in decode64 order, which is the order bdec has; apack is
     * its transpose (16 rows per step, zeros past M). */
    decode_rows(p, (__m512i *)rows);
    for (long st = 0; st < steps; st++)
        for (int r = 0; r < 16; r++) apack[st * 16 + r] = r < p->M ? rows[r * steps + st] : 0;
    for (long kb = 0; kb < p->KB; kb++)
        for (int lane = 0; lane < 16; lane++) {
            long r = lane % 2 ? 8 + lane / 2 : lane / 2;
            as16[kb * 16 + lane] = r < p->M ? p->as[r * p->KB + kb] : 0.0f;
        }
    free(rows);
    long per = column_run(p, nthreads, NG);
    rl_problem q = {p, apack, as16, per};
    parallel_for(item_rl, &q, (p->N + per - 1) / per, nthreads);
    free(apack);
    free(as16);
    return p->failed ? ENOMEM : 0;
}


/* ---- rows as dot products: M <= DOT_MAX_ROWS ------------------------------------------------
 * With one row (a decode step of one sequence) the products are few and the time is B's trip
 * from memory. The tiles above read B as 32 interleaved row streams and transpose it, which the
 * hardware prefetchers follow poorly (short K: every strip starts cold). Here each thread reads
 * its own contiguous run of B's rows front to back (4 rows side by side), and
 * each 64-byte chunk is decoded in place: two table lookups, then an in-lane byte interleave to
 * bf16 pairs. The interleave leaves the values in the order 0-7, 16-23, 32-39, 48-55 (first
 * vector) and 8-15, 24-31, 40-47, 56-63 (second); A is decoded by the same code, so lane j of
 * vdpbf16ps multiplies matching pairs: a dot product in another order, which the contract
 * allows. Each K block's 16-lane partial sums are reduced to one fp32 sum per (row, column),
 * then promoted and accumulated exactly as the tiles do. */
#ifndef DOT_MAX_ROWS
#define DOT_MAX_ROWS 1 /* measured (interleaved, one process): 1 row reads short-K weights 1.1-2.2x faster than
                          * the tiles and long-K ones as fast; from 2 rows the tiles are faster (their transpose
                          * is shared by the rows, where this kernel's per-column reductions are not), and
                          * the lane groups below as fast as this kernel at 2 rows (0.9-1.05x, slot prefetch) */
#endif
typedef struct {
    const problem *p;
    const __m512i *apack; /* [M][K/64][2]: each 64-byte chunk of A's rows as decode64 leaves it */
    long cols_per_item;
} dot_problem;

/* The lane sums of v[0..3] as [sum v0, sum v1, sum v2, sum v3]. */
static inline __attribute__((always_inline)) __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1)); /* per 128-bit lane: v0 v1 v0 v1 */
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1)))); /* v0 v1 v2 v3 */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Columns [n, n + NCOL) of out for every row (MRT = M): NCOL x MRT accumulators, at most 16, so
 * that they, the decoder's constants and the temporaries stay in the 32 registers (A's decoded
 * pairs are loaded per column: L1 hits). */
static inline __attribute__((always_inline)) void dot_cols(const int MRT, const int NCOL, const problem *p, const __m512i *apack,
                                                             const decoder *d, long n) {
    const long KB = p->KB, chunks = 2 * KB;
    float C[16];
    for (int i = 0; i < MRT * NCOL; i++) C[i] = 0.0f;
    for (long kb = 0; kb < KB; kb++) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < MRT * NCOL; i++) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
            for (int c = 0; c < NCOL; c++) {
                const uint8_t *src = p->b + (n + c) * p->ldb + kb * BLK + 64 * h;
                _mm_prefetch(slot_ahead(p, n + c, NCOL, kb * BLK + 64 * h), STREAM_HINT);
                __m512i u0, u1;
                decode64(d, _mm512_loadu_si512(src), &u0, &u1);
#pragma GCC unroll 8
                for (int r = 0; r < MRT; r++) {
                    const __m512i *ar = apack + (r * chunks + 2 * kb + h) * 2;
                    acc[c * MRT + r] = _mm512_dpbf16_ps(acc[c * MRT + r], (__m512bh)_mm512_load_si512(ar), (__m512bh)u0);
                    acc[c * MRT + r] = _mm512_dpbf16_ps(acc[c * MRT + r], (__m512bh)_mm512_load_si512(ar + 1), (__m512bh)u1);
                }
            }
        }
        float sums[16];
#pragma GCC unroll 4
        for (int i = 0; i + 4 <= MRT * NCOL; i += 4) _mm_storeu_ps(sums + i, hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
        for (int i = MRT * NCOL / 4 * 4; i < MRT * NCOL; i++) sums[i] = _mm512_reduce_add_ps(acc[i]);
        for (int c = 0; c < NCOL; c++) {
            float sb = col_scale(p, n + c, kb);
            for (int r = 0; r < MRT; r++) {
                float t = sums[c * MRT + r] * p->as[r * KB + kb];
                t = t * sb;
                C[c * MRT + r] += t;
            }
        }
    }
    for (int c = 0; c < NCOL; c++)
        for (int r = 0; r < MRT; r++) put_out(p, r, n + c, C[c * MRT + r]);
}

/* Columns per call of dot_cols for m rows: 4 up to 4 rows, then 2 (at most 16 accumulators). */
#define DOT_NCOL(m) ((m) <= 4 ? 4 : 2)
#define DOT_FN(m)                                                                                                    \
    static void dot_run_##m(const problem *p, const __m512i *apack, const decoder *d, long n0, long n1) {            \
        long n = n0;                                                                                                 \
        for (; n + DOT_NCOL(m) <= n1; n += DOT_NCOL(m)) dot_cols(m, DOT_NCOL(m), p, apack, d, n);                  \
        for (; n < n1; n++) dot_cols(m, 1, p, apack, d, n);                                                          \
    }
DOT_FN(1)
typedef void (*dot_fn)(const problem *, const __m512i *, const decoder *, long, long);
static const dot_fn dot_runs[DOT_MAX_ROWS + 1] = {NULL, dot_run_1}; /* widen with DOT_MAX_ROWS (dot_cols takes up to 8 rows) */

static void item_dot(void *ctx, long item, int tid) {
    (void)tid;
    const dot_problem *q = ctx;
    long n0 = item * q->cols_per_item, n1 = column_run_end(q->p, n0, q->cols_per_item);
    decoder d;
    decoder_init(&d);
    dot_runs[q->p->M](q->p, q->apack, &d, n0, n1);
}

/* 1 <= M <= DOT_MAX_ROWS (K a multiple of 128): returns 0, or ENOMEM. */
static int gemm_dot(problem *p, int nthreads) {
    long chunks = p->K / 64;
    __m512i *apack = NULL;
    if (posix_memalign((void **)&apack, 64, (size_t)p->M * (size_t)chunks * 128) != 0) return ENOMEM;
    decode_rows(p, apack);
    long per = column_run(p, nthreads, 4);
    dot_problem q = {p, apack, per};
    parallel_for(item_dot, &q, (p->N + per - 1) / per, nthreads);
    free(apack);
    return 0;
}


/* ---- rows in lane groups: 2 <= M <= GL_MAX_ROWS -------------------------------------------
 * A few rows (decode batches of 2 to 8): B is read as the one-row kernel reads it (each thread a
 * contiguous run of rows, 64-byte chunks decoded in place by decode64, 4 columns side by side, 2
 * for 5-8 rows), and multiplied as it lies, with no transpose and no permutation. The 16 lanes of
 * an accumulator are R groups of G = 16 / R lanes (R = 2, 4 or 8 row slots for up to 2, 4 or 8
 * rows), and each column has R accumulators, one per rotation s: in accumulator s, lane j pairs
 * B's decoded pair j with the same pair of row (j / G + s) mod R, as A is packed (zeros past M).
 * So a 64-byte chunk of B costs 2R products per column (R / M times what the rows need). At a K
 * block's end, accumulator s is rotated by s groups (one vpermps) so that group r holds row r's
 * products, the R accumulators are added, each group's G lanes are summed (log2 G shuffles; with
 * 4- and 8-lane groups four columns' sums are gathered into one vector as they are summed), and
 * row r's block sum is promoted in the vector as (p * sa) * sb and added to its fp32 sum. */
/* Measured (interleaved in one process, weights cycled through memory): against the tiles, 2-4
 * rows 1.1x at K = 7168 and 1.8-1.9x at K = 512, 5-8 rows 1.0-1.15x from K = 2048 and 1.7x at
 * K = 512; against this kernel's earlier form (one accumulator per column, B's pairs copied into
 * every group by a vpermd per product) 1.0-1.1x with both cores and 1.05-1.1x on one (m=4). */
#ifndef GL_MAX_ROWS
#define GL_MAX_ROWS 8
#endif
_Static_assert(GL_MAX_ROWS <= 8, "at most 8 row slots (G >= 2)");

typedef struct {
    const problem *p;
    const __m512i *apack;  /* [K/64][2][R]: lane j of (chunk, half v, rotation s) = row (j / G + s) mod R's pair 16 v + j of the chunk (decode64 order), 0 past M */
    const float *as_lanes; /* [KB][16]: lanes r*G .. r*G + G - 1 = a_scales[r][kb], 0 past M */
    long cols_per_item;
} gl_problem;

/* gl_rot[i][s]: the dword permutation that moves lane group (g - s) mod R to group g (i = 0, 1, 2
 * for G = 8, 4, 2; R = 16 / G). */
static __m512i gl_rot[3][8];
static pthread_once_t gl_once = PTHREAD_ONCE_INIT;

static void gl_init(void) {
    const int gs[3] = {8, 4, 2};
    for (int i = 0; i < 3; i++) {
        int G = gs[i], R = 16 / G;
        for (int s = 0; s < R; s++) {
            int32_t lanes[16];
            for (int l = 0; l < 16; l++) lanes[l] = ((l / G - s + R) % R) * G + l % G;
            gl_rot[i][s] = _mm512_loadu_si512(lanes);
        }
    }
}

/* Lane r*G of the result: the sum of lanes r*G .. r*G + G - 1 of v. */
static inline __attribute__((always_inline)) __m512 group_sums(const int G, __m512 v) {
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1)); /* neighbours */
    if (G >= 4) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E)); /* 64-bit halves of each 128 */
    if (G >= 8) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1)); /* neighbouring 128-bit lanes */
    return v;
}

/* K ranges. At 5-8 rows A's rotations take 2 KiB per K block (16 KiB at K = 2048; 112 KiB at
 * K = 7168, 256 KiB at K = 16384), so at long K every column read them from L2. Past GL_A_SPLIT
 * bytes of them, a run of columns is computed K range by K range, each range's rotations (at most
 * GL_A_BYTES) staying in L1 while every column of the run goes through it; a column's promoted
 * sums wait in memory between ranges (the same additions in the same order: results bit for bit
 * as before), and the prefetch, which then cannot follow a column's own stream, fetches the same
 * chunk GL_PF_COLS columns on. Measured (interleaved, one process, weights cycled through memory,
 * GB/s of weight bytes): m=8 n=2112 K=7168 21-22 -> 30-32, n=4096 K=7168 22-24 -> 33-34,
 * n=7168 K=16384 20 -> 34-35, m=6 alike; K <= 2048 unsplit (unchanged); 2-4 rows the same
 * either way (0.95-1.05x). Ranges of 16 or 24 KiB measured alike; prefetching 2 columns on was
 * 5-10% slower than 4 or 8. */
#ifndef GL_A_BYTES
#define GL_A_BYTES 24576
#endif
#ifndef GL_A_SPLIT
#define GL_A_SPLIT 32768
#endif
#ifndef GL_PF_COLS
#define GL_PF_COLS 4
#endif

/* Columns per gl_cols call: 4, or 2 for 8 row slots (16 accumulators either way); column_run hands
 * out whole groups of 4, which both divide. */
#define GL_NCOL(g) ((g) == 2 ? 2 : 4)

/* What to prefetch while column n reads its 64-byte chunk ch: within a K range (ranged) the same
 * chunk GL_PF_COLS columns on, else DOT_PREFETCH bytes on along the column's slot (slot_ahead). */
static inline const char *gl_ahead(const problem *p, long n, int ncol, long ch, int ranged) {
    return ranged ? (const char *)(p->b + (n + GL_PF_COLS) * p->ldb + ch * 64) : slot_ahead(p, n, ncol, ch * 64);
}

/* Columns [n, n + NCOL) of out for every row: NCOL x R accumulators (at most 16), over K blocks
 * [kb0, kb1): the promoted sums start from cv (16 floats per column) unless kb0 is 0, and are left
 * there unless kb1 is the last block, where the output is written. */
static inline __attribute__((always_inline)) void gl_cols(const int G, const int NCOL, const gl_problem *q, const decoder *d, long n, long kb0, long kb1, float *cv) {
    const problem *p = q->p;
    const long KB = p->KB;
    const int R = 16 / G, gi = G == 8 ? 0 : (G == 4 ? 1 : 2);
    const int ranged = kb0 > 0 || kb1 < KB;
    __m512 Cv[4];
#pragma GCC unroll 4
    for (int c = 0; c < NCOL; c++) Cv[c] = kb0 ? _mm512_load_ps(cv + 16 * c) : _mm512_setzero_ps();
    for (long kb = kb0; kb < kb1; kb++) {
        __m512 acc[4][8];
#pragma GCC unroll 4
        for (int c = 0; c < NCOL; c++)
#pragma GCC unroll 8
            for (int s = 0; s < R; s++) acc[c][s] = _mm512_setzero_ps();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            long ch = 2 * kb + h;
            const __m512i *ap = q->apack + ch * 2 * R;
            if (G == 8) { /* 2 rows: columns outermost, as measured best there (below: 1.0x) */
#pragma GCC unroll 4
                for (int c = 0; c < NCOL; c++) {
                    const uint8_t *src = p->b + (n + c) * p->ldb + ch * 64;
                    _mm_prefetch(gl_ahead(p, n + c, NCOL, ch, ranged), STREAM_HINT);
                    __m512i w[2];
                    decode64(d, _mm512_loadu_si512(src), &w[0], &w[1]);
#pragma GCC unroll 2
                    for (int v = 0; v < 2; v++)
#pragma GCC unroll 8
                        for (int s = 0; s < R; s++)
                            acc[c][s] = _mm512_dpbf16_ps(acc[c][s], (__m512bh)_mm512_load_si512(ap + v * R + s), (__m512bh)w[v]);
                }
                continue;
            }
            __m512i u[4][2];
#pragma GCC unroll 4
            for (int c = 0; c < NCOL; c++) {
                const uint8_t *src = p->b + (n + c) * p->ldb + ch * 64;
                _mm_prefetch(gl_ahead(p, n + c, NCOL, ch, ranged), STREAM_HINT);
                decode64(d, _mm512_loadu_si512(src), &u[c][0], &u[c][1]);
            }
            /* Columns innermost: each of A's vectors is loaded once for all NCOL columns (registers:
             * 16 accumulators, 2 x NCOL decoded vectors, A's vector, 5 decoder constants), where
             * loading it per column made A's loads as many as the products; from 5 rows A's rotations
             * outgrow L1 at long K. Measured (interleaved, weights from memory, GB/s of weights):
             * m=3 n=24576 K=1536 25.5 -> 29.1, m=4 n=4096 K=7168 27.6 -> 29.7, m=5-8 1.04-1.11x
             * (m=8 n=7168 K=16384 14.7 -> 16.2); m=2 the same either way. */
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++)
#pragma GCC unroll 8
                for (int s = 0; s < R; s++) {
                    __m512bh a = (__m512bh)_mm512_load_si512(ap + v * R + s);
#pragma GCC unroll 4
                    for (int c = 0; c < NCOL; c++) acc[c][s] = _mm512_dpbf16_ps(acc[c][s], a, (__m512bh)u[c][v]);
                }
        }
        __m512 sa = _mm512_load_ps(q->as_lanes + kb * 16);
        __m512 sum[4];
#pragma GCC unroll 4
        for (int c = 0; c < NCOL; c++) {
            sum[c] = acc[c][0];
#pragma GCC unroll 8
            for (int s = 1; s < R; s++) sum[c] = _mm512_add_ps(sum[c], _mm512_permutexvar_ps(gl_rot[gi][s], acc[c][s]));
        }
        if (G >= 4 && NCOL == 4) {
            /* The four columns' group sums in one vector (a transpose within each 128-bit lane that
             * adds as it goes), promoted as one vector: lane r * G + c = row r, column c. 4-lane
             * groups: 6 shuffles and 3 adds where four group_sums take 8 and 8; 8-lane groups one
             * shuffle and add more (neighbouring 128-bit lanes), where four group_sums take 12 and
             * 12. Measured (interleaved, weights from memory): 1.1-1.2x at 3-4 rows, K 512-16384,
             * 1.02-1.08x at 2 rows. (2-lane groups, 5-8 rows, the same way: no gain, not kept.) */
            __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(sum[0], sum[1]), _mm512_unpackhi_ps(sum[0], sum[1]));
            __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(sum[2], sum[3]), _mm512_unpackhi_ps(sum[2], sum[3]));
            __m512 y = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))));
            if (G == 8) y = _mm512_add_ps(y, _mm512_shuffle_f32x4(y, y, 0xB1));
            __m512 sb;
            if (!p->b_per_token && n % 4 == 0) { /* the columns share a 128-column block (column_run hands out multiples of 4) */
                sb = _mm512_set1_ps(col_scale(p, n, kb));
            } else {
                sb = _mm512_broadcast_f32x4(_mm_set_ps(col_scale(p, n + 3, kb), col_scale(p, n + 2, kb), col_scale(p, n + 1, kb), col_scale(p, n, kb)));
            }
            Cv[0] = _mm512_add_ps(Cv[0], _mm512_mul_ps(_mm512_mul_ps(y, sa), sb));
        } else {
#pragma GCC unroll 4
            for (int c = 0; c < NCOL; c++) {
                __m512 t = _mm512_mul_ps(group_sums(G, sum[c]), sa);
                t = _mm512_mul_ps(t, _mm512_set1_ps(col_scale(p, n + c, kb)));
                Cv[c] = _mm512_add_ps(Cv[c], t);
            }
        }
    }
    if (kb1 < KB) { /* the next K range goes on from these sums */
#pragma GCC unroll 4
        for (int c = 0; c < NCOL; c++) _mm512_store_ps(cv + 16 * c, Cv[c]);
        return;
    }
    /* The outputs, rounded in the vectors (bf16_bits) and stored a row's columns at once where they
     * lie side by side: put_out per element (its rounding, NaN test and out_f32 branch, 16 times
     * per column pair) cost as much as the products at short K. Measured (interleaved, one process,
     * weights from memory): m=8 n=32768 K=512 21.7 -> 27.6 GB/s of weights, m=6 25.0 -> 29.0, m=8
     * n=7168 K=2048 27.3 -> 30.0, K=1536 1.06x; 2-4 rows and long K the same. Bits unchanged. */
    if (G >= 4 && NCOL == 4) { /* lanes r * G .. r * G + 3: row r's four columns, side by side in out */
        if (p->out_f32) {
            __attribute__((aligned(64))) float v16[16];
            _mm512_store_ps(v16, Cv[0]);
            for (long r = 0; r < p->M; r++) memcpy((float *)p->out + r * p->ldo + n, v16 + r * G, 16);
        } else {
            __attribute__((aligned(32))) uint16_t h16[16];
            _mm256_store_si256((__m256i *)h16, _mm512_cvtepi32_epi16(bf16_bits(Cv[0])));
            for (long r = 0; r < p->M; r++) memcpy((uint16_t *)p->out + r * p->ldo + n, h16 + r * G, 8);
        }
        return;
    }
    if (p->out_f32) {
        for (int c = 0; c < NCOL; c++) {
            __attribute__((aligned(64))) float v16[16];
            _mm512_store_ps(v16, Cv[c]);
            for (long r = 0; r < p->M; r++) ((float *)p->out)[r * p->ldo + n + c] = v16[r * G];
        }
        return;
    }
    if (NCOL == 2) { /* row r's two columns as one dword, from lane r * G of each */
        __attribute__((aligned(64))) uint32_t w16[16];
        __m512i w = _mm512_or_si512(_mm512_and_si512(bf16_bits(Cv[0]), _mm512_set1_epi32(0xffff)), _mm512_slli_epi32(bf16_bits(Cv[1]), 16));
        _mm512_store_si512(w16, w);
        for (long r = 0; r < p->M; r++) memcpy((uint16_t *)p->out + r * p->ldo + n, w16 + r * G, 4);
        return;
    }
    for (int c = 0; c < NCOL; c++) {
        __attribute__((aligned(32))) uint16_t h16[16];
        _mm256_store_si256((__m256i *)h16, _mm512_cvtepi32_epi16(bf16_bits(Cv[c])));
        for (long r = 0; r < p->M; r++) ((uint16_t *)p->out)[r * p->ldo + n + c] = h16[r * G];
    }
}

#define GL_FN(g)                                                                                     \
    static void gl_run_##g(const gl_problem *q, const decoder *d, long n0, long n1, float *cv) {    \
        const long KB = q->p->KB, per_kb = 16 / (g) * 256;                                          \
        const long ranges = KB * per_kb <= GL_A_SPLIT ? 1 : (KB * per_kb + GL_A_BYTES - 1) / GL_A_BYTES; \
        const long step = (KB + ranges - 1) / ranges;                                                \
        for (long kb0 = 0; kb0 < KB; kb0 += step) {                                                  \
            long kb1 = kb0 + step < KB ? kb0 + step : KB, n = n0;                                    \
            for (; n + GL_NCOL(g) <= n1; n += GL_NCOL(g)) gl_cols(g, GL_NCOL(g), q, d, n, kb0, kb1, cv + (n - n0) * 16); \
            for (; n < n1; n++) gl_cols(g, 1, q, d, n, kb0, kb1, cv + (n - n0) * 16);               \
        }                                                                                            \
    }
GL_FN(2) GL_FN(4) GL_FN(8)

static int gl_pairs(long M) { return M <= 2 ? 8 : (M <= 4 ? 4 : 2); }

static void item_gl(void *ctx, long item, int tid) {
    (void)tid;
    const gl_problem *q = ctx;
    long n0 = item * q->cols_per_item, n1 = column_run_end(q->p, n0, q->cols_per_item);
    float *cv = scratch((size_t)(n1 - n0 + 4) * 64); /* each column's sums between K ranges */
    if (!cv) {
        __atomic_store_n((int *)&q->p->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    decoder d;
    decoder_init(&d);
    int G = gl_pairs(q->p->M);
    if (G == 8) gl_run_8(q, &d, n0, n1, cv);
    else if (G == 4) gl_run_4(q, &d, n0, n1, cv);
    else gl_run_2(q, &d, n0, n1, cv);
}

/* 2 <= M <= GL_MAX_ROWS (K a multiple of 128; see the dispatch in hal_fp8_gemm): returns 0, or ENOMEM. */
static int gemm_lane_groups(problem *p, int nthreads) {
    pthread_once(&gl_once, gl_init);
    const long chunks = p->K / 64;
    const int G = gl_pairs(p->M), R = 16 / G;
    __m512i *apack = NULL, *rows = NULL;
    float *as_lanes = NULL;
    if (posix_memalign((void **)&apack, 64, (size_t)chunks * 2 * R * 64) != 0) return ENOMEM;
    if (posix_memalign((void **)&rows, 64, (size_t)p->M * chunks * 128) != 0 ||
        posix_memalign((void **)&as_lanes, 64, (size_t)p->KB * 64) != 0) {
        free(apack);
        free(rows);
        return ENOMEM;
    }
    decode_rows(p, rows);
    const uint32_t *dec = (const uint32_t *)rows; /* [M][chunks][32] pairs */
    /* Rotation s takes lanes [gG, gG + G) from row (g + s) mod R: a blend of the R rows' vectors. */
    for (long c = 0; c < chunks; c++)
        for (int v = 0; v < 2; v++) {
            __m512i row[GL_MAX_ROWS];
            for (int r = 0; r < R; r++)
                row[r] = r < p->M ? _mm512_load_si512(dec + (r * chunks + c) * 32 + 16 * v) : _mm512_setzero_si512();
            for (int s = 0; s < R; s++) {
                __m512i out = _mm512_setzero_si512();
                for (int g = 0; g < R; g++) out = _mm512_mask_mov_epi32(out, (__mmask16)(((1u << G) - 1) << (g * G)), row[(g + s) % R]);
                _mm512_store_si512(apack + (c * 2 + v) * R + s, out);
            }
        }
    for (long kb = 0; kb < p->KB; kb++)
        for (int lane = 0; lane < 16; lane++) {
            long r = lane / G;
            as_lanes[kb * 16 + lane] = r < p->M ? p->as[r * p->KB + kb] : 0.0f; /* every lane of row r's group */
        }
    free(rows);
    long per = column_run(p, nthreads, 4);
    gl_problem q = {p, apack, as_lanes, per};
    parallel_for(item_gl, &q, (p->N + per - 1) / per, nthreads);
    free(apack);
    free(as_lanes);
    return p->failed ? ENOMEM : 0;
}

#define APACK_ELEM 2 /* bytes per decoded A value */

#else
/* ------------------------------------------------------------------------------------------ */
/* portable path: fp32 products of decoded values, 16 partial sums per dot product            */

static void item_pack_a(void *ctx, long s, int tid) {
    (void)tid;
    problem *p = ctx;
    for (long r = p->strip_r0[s]; r < p->strip_r0[s + 1]; r++) {
        const uint8_t *row = p->a + (p->m0 + r) * p->lda;
        float *dst = (float *)p->apack + r * p->K;
        for (long k = 0; k < p->K; k++) dst[k] = lut_f32[row[k]];
    }
}

static void item_gemm(void *ctx, long item, int tid) {
    (void)tid;
    problem *p = ctx;
    long strip = item % p->ncs, group = item / p->ncs;
    long n0 = strip * NR;
    int s0 = p->group_s0[group], s1 = p->group_s0[group + 1];
    long row0 = p->strip_r0[s0], rows = p->strip_r0[s1] - row0;
    long cols = p->N - n0 < NR ? p->N - n0 : NR;
    size_t c_bytes = (size_t)rows * NR * 4, cs_bytes = (size_t)p->KB * NR * 4, b_bytes = (size_t)NR * BLK * 4;
    char *mem = scratch(b_bytes + c_bytes + cs_bytes);
    if (!mem) {
        __atomic_store_n(&p->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *bf = (float *)mem, *C = (float *)(mem + b_bytes), *cs = (float *)(mem + b_bytes + c_bytes);
    scale_strip(p, n0, cs);
    memset(C, 0, c_bytes);
    for (long kb = 0; kb < p->KB; kb++) {
        for (long c = 0; c < cols; c++) {
            const uint8_t *src = p->b + (n0 + c) * p->ldb + kb * BLK;
            for (int k = 0; k < BLK; k++) bf[c * BLK + k] = lut_f32[src[k]];
        }
        for (long r = 0; r < rows; r++) {
            const float *ar = (const float *)p->apack + (row0 + r) * p->K + kb * BLK;
            float sa = p->as[(p->m0 + row0 + r) * p->KB + kb];
            for (long c = 0; c < cols; c++) {
                const float *bc = bf + c * BLK;
                float part[16] = {0};
                for (int k = 0; k < BLK; k += 16)
                    for (int j = 0; j < 16; j++) part[j] += ar[k + j] * bc[k + j];
                float sum = 0.0f;
                for (int j = 0; j < 16; j++) sum += part[j];
                float t = sum * sa;
                t = t * cs[kb * NR + c];
                C[r * NR + c] += t;
            }
        }
    }
    write_rows_scalar(p, p->m0 + row0, (int)rows, n0, C);
}

#define APACK_ELEM 4
#endif

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                               */

const char *hal_fp8_path(void) { return HAL_FAST ? "avx512_bf16" : "portable C"; }

/* out = blockwise-scaled a @ b.T. Returns 0, or ENOMEM. */
int hal_fp8_gemm(const uint8_t *a, long lda, const float *as, const uint8_t *b, long ldb, const float *bs, int b_per_token, void *out,
                 long ldo, int out_f32, long M, long N, long K, int nthreads) {
    pthread_once(&lut_once, lut_init);
    if (M <= 0 || N <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    problem p = {a, lda, as, b, ldb, bs, b_per_token, out, ldo, out_f32, M, N, K, K / BLK, 0, 0, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0};
    if (p.KB == 0) { /* no products: every sum is zero */
        for (long m = 0; m < M; m++) memset((char *)out + m * ldo * (out_f32 ? 4 : 2), 0, (size_t)N * (out_f32 ? 4 : 2));
        return 0;
    }
#if HAL_FAST
    if (M > 16 && M <= PASS_MAX_ROWS && K % BLK == 0) {
        /* 16 rows at a time (the rows-in-lanes kernel), the last 1-16 rows by their own kernel:
         * each pass reads and decodes B again, which up to PASS_MAX_ROWS rows costs less than the
         * tiles' transpose of B (rows are independent: the same sums as one call would give). */
        for (long r0 = 0; r0 < M; r0 += 16) {
            long rows = M - r0 < 16 ? M - r0 : 16;
            int rc = hal_fp8_gemm(a + r0 * lda, lda, as + r0 * p.KB, b, ldb, bs, b_per_token,
                                  (char *)out + r0 * ldo * (out_f32 ? 4 : 2), ldo, out_f32, rows, N, K, nthreads);
            if (rc) return rc;
        }
        return 0;
    }
    p.pf_rows = DOT_PREFETCH / K; /* K >= BLK here */
    p.pf_rest = DOT_PREFETCH % K;
    if (M <= DOT_MAX_ROWS && K % BLK == 0) return gemm_dot(&p, nthreads);
    if (M <= GL_MAX_ROWS && K % BLK == 0) return gemm_lane_groups(&p, nthreads);
    if (M >= RL_MIN_ROWS && M <= 16 && K % BLK == 0) return gemm_rows_in_lanes(&p, nthreads);
#endif
    p.ncs = (N + NR - 1) / NR;
    long ms = A_PACK_BYTES / (APACK_ELEM * K);
    if (ms < MR) ms = MR;
    if (ms > M) ms = M;
    long max_strips = (ms + MR - 1) / MR;
    long *strip_r0 = malloc(sizeof(long) * (size_t)(max_strips + 1));
    int *group_s0 = malloc(sizeof(int) * (size_t)(max_strips + 1));
    void *apack = NULL;
    if (!strip_r0 || !group_s0 || posix_memalign(&apack, 64, (size_t)ms * (size_t)K * APACK_ELEM) != 0) {
        free(strip_r0);
        free(group_s0);
        return ENOMEM;
    }
    p.strip_r0 = strip_r0;
    p.group_s0 = group_s0;
    p.apack = apack;
    int rc = 0;
    for (long m0 = 0; m0 < M && !rc; m0 += ms) {
        long mc = M - m0 < ms ? M - m0 : ms;
        p.m0 = m0;
        p.mc = mc;
        /* row strips of at most MR rows, balanced */
        int ns = (int)((mc + MR - 1) / MR);
        for (int s = 0; s <= ns; s++) strip_r0[s] = (mc * s) / ns;
        p.nstrips = ns;
        /* groups of strips: at most GROUP_ROWS rows, and enough items to keep every thread busy */
        long ng = (mc + GROUP_ROWS - 1) / GROUP_ROWS;
        long want = (4L * nthreads + p.ncs - 1) / p.ncs;
        if (ng < want) ng = want;
        if (ng > ns) ng = ns;
        if (mc <= 2 * MR) ng = 1;
        for (long g = 0; g <= ng; g++) group_s0[g] = (int)((ns * g) / ng);
        p.ngroups = (int)ng;
        if (mc <= 2 * MR) {
            for (int s = 0; s < ns; s++) item_pack_a(&p, s, 0);
        } else {
            parallel_for(item_pack_a, &p, ns, nthreads);
        }
        parallel_for(item_gemm, &p, p.ncs * ng, nthreads);
        if (p.failed) rc = ENOMEM;
    }
    free(apack);
    free(strip_r0);
    free(group_s0);
    return rc;
}
