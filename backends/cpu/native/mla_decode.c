/* MLA decode over a paged bf16/fp16 KV cache (FlashMLA's flash_mla_with_kvcache, dense mode) for
 * the cpu backend of unihal.
 *
 * Built on the user's machine (cc -O3 -march=native -std=c11 -ffp-contract=off -pthread -shared
 * -fPIC, alone or together with the other native kernels) and called through ctypes by
 * hal.backends.cpu.mla_native. Every exported symbol is prefixed hal_mla_, all else is static
 * (parallel.h, the work sharing it shares with the other kernels, included). The fast path needs AVX-512 F/BW/BF16 (AMD Zen 4 and later, Intel Cooper Lake /
 * Sapphire Rapids and later); any other target compiles the portable C path.
 *
 * Contract (hal.ops.mla_reference.mla_decode_reference): q [b, s_q, h_q, 576], k_cache
 * [blocks, 64, h_kv, 576] (V = the first 512 channels of each key), block_table int32 [b, pages],
 * cache_seqlens int32 [b]. Query head h uses KV head h / (h_q / h_kv). For one KV head of one
 * sequence the "rows" are the s_q * group (token t, head) pairs, row = t * group + head-in-group.
 * Row t sees keys [0, vis) with vis = L, or clamp(L - s_q + 1 + t, 0, L) when causal. Per row:
 * s = (q . k) * scale in fp32, m = max s, p = exp(s - m) (0 for unseen keys; m taken as 0 while it
 * is -inf), l = sum p, out = (sum over every key of the sequence of p * v) / l rounded to q's dtype
 * (round to nearest even), lse = m + log(l). A row that sees no key: out 0, lse +inf. Keys past
 * the sequence's end are never read, so the slots and pages it does not own never matter.
 *
 * Work item: (sequence, KV head, block of at most 128 rows, split of the sequence's pages), longest
 * first, taken dynamically by OpenMP threads (torch's: parallel.h), or by a small pthread pool
 * where the compiler has no OpenMP. Pages are split only when
 * there are fewer (sequence, head, rows) items than twice the threads; the splits' unnormalised
 * states are then merged like FlashMLA's combine kernel. Per item and per 64-key page:
 *   - QK with the rows in the vector lanes. The item's q is packed once as [pair P][row] dwords
 *     (bf16 channels 2P, 2P+1 of each row); each key's dword P is broadcast straight from the
 *     cache and vdpbf16ps accumulates 16 rows' dot products with that key in one zmm (bf16
 *     products are exact in fp32, the sums fp32). Register tiles of 1 x 16 rows by 16 keys, or 3
 *     (2, 1) x 16 rows by 8 keys. fp16 (not exact in bf16) widens the page to fp32 and uses fp32
 *     FMAs. The next page is prefetched into L2 along the way.
 *   - Online softmax per lane (row): running max m, sum l, and the factor alpha = exp(m_old - m_new)
 *     applied to the output accumulator when it is next loaded. The expf is vectorised: Cody-Waite
 *     reduction, Cephes' polynomial, vscalefps for 2^n (correctly rounded subnormal results, 0 for
 *     -inf, NaN for NaN); about 1 ulp.
 *   - P . V in fp32 with the fp32 p: O [rows][512] += p * v by FMAs, tiles of 6 rows x 64 channels.
 *     A zmm of 32 bf16 values widens by a shift (its even channels) and a mask (its odd ones), so
 *     the accumulator keeps, per 32 channels, the 16 even then the 16 odd ones; the output is
 *     un-permuted when written. (Rounding p to bf16 for vdpbf16ps over key pairs, as FlashMLA's
 *     kernel does, halves this step's cost but breaks the per-element bound by up to 2x on short
 *     sequences: |p - bf16(p)| up to 2^-9 p meets cancelling values.)
 *   - Finally out = O / l (a division, as the reference) rounded to nearest even, lse = m + logf(l).
 * NaN and infinities flow as in the reference: a NaN or +inf score makes p NaN, hence l, out and
 * lse NaN; a non-finite v of an unseen key inside the sequence meets p = 0 in P . V (NaN); scores
 * all -inf give l = 0, out 0/0 = NaN and lse -inf. The one deviation: vdpbf16ps treats bf16
 * subnormal inputs (|x| < 1.2e-38) as zero and flushes subnormal partial sums.
 */

#define _POSIX_C_SOURCE 200809L /* clock_gettime, posix_memalign under -std=c11 */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define MLA_FAST 1
#include <immintrin.h>
#else
#define MLA_FAST 0
#endif

#define MLA_D 576      /* q/k channels */
#define MLA_DV 512     /* v channels */
#define MLA_PAIRS 288  /* channel pairs of q/k */
/* Dot products of 576 channels are summed in chunks of MLA_QK_CHUNK channel pairs, each from zero,
 * then the chunks' sums added: one fp32 chain of 576 products rounds each addition against the
 * whole running sum, so its error grows with its length; FlashMLA's MMA tiles and the reference's
 * blocked matmul sum in short runs too. With keys 40x N(0,1) in an fp16 cache the single chain
 * was up to 1.3x FlashMLA's per-element bound (the reference: 0.9x; chunked: 0.3x). The fast
 * path's folds cost a load, an add and a store per accumulator and chunk (about 4% of the
 * products' instructions at 48 pairs; no change measured in decode times). */
#ifndef MLA_QK_CHUNK
#define MLA_QK_CHUNK 48
#endif
_Static_assert(MLA_PAIRS % MLA_QK_CHUNK == 0, "MLA_QK_CHUNK must divide the 288 channel pairs");
#define MLA_PAGE 64    /* keys per page */
#define MLA_RB_MAX 128 /* most rows per work item */
#define MLA_MAX_SPLITS 64

/* flags: bits 8..15 force this many splits of each sequence's pages (tests); other bits unused */

enum { MLA_OK = 0, MLA_ENOMEM = 1, MLA_EBLOCK = 2, MLA_ESEQLEN = 3, MLA_ESHAPE = 4 };

typedef uint32_t mla_u32a __attribute__((may_alias, aligned(1)));

/* ------------------------------------------------------------------------------------------ */
/* threads: OpenMP (torch's threads), else a small pthread pool                               */

#include "float_bits.h"
#include "parallel.h"

/* ------------------------------------------------------------------------------------------ */
/* problem and per-thread scratch                                                             */

typedef struct {
    const uint8_t *q; long q_sb, q_st, q_sh;      /* strides in elements */
    const uint8_t *k; long k_sblk, k_sslot, k_sh; /* strides in elements */
    long num_blocks;
    const int32_t *bt; long bt_stride, max_pages;
    const int32_t *seqlens;
    uint16_t *out; float *lse;
    int batch, s_q, h_q, h_kv, group, rows, nrb, rb, ldq;
    float scale;
    int causal, fp16, nsplit;
    long *order;     /* items, longest first */
    float *partial;  /* nsplit > 1: per item [ldq][512] O, ldq m, ldq l */
    int error;       /* atomic */
} mla_prob;

typedef struct {
    void *qp;      /* bf16 fast: uint32 [288][ldq] pairs; fp16 fast: float [576][ldq]; portable: float [ldq][576] */
    float *s;      /* scores, then p: [64][ldq] (portable: [ldq][64]) */
    float *kf;     /* fp16 / portable: page widened to fp32, [64][576] */
    uint16_t *ktail; /* bf16 fast: the page's last keys zero-padded to a tile, [16][576] */
    float *o;      /* [ldq][512] */
    float *m, *l, *alpha;
    int *vis;
} mla_scratch;

static __thread void *mla_scratch_ptr;
static __thread size_t mla_scratch_cap;

static size_t mla_align(size_t x) { return (x + 63) & ~(size_t)63; }

static int mla_get_scratch(int ldq, int widen, mla_scratch *sc) {
    enum { N = 7 };
    size_t sz[N] = {
        (size_t)MLA_D * ldq * 4, (size_t)MLA_PAGE * ldq * 4, widen ? (size_t)MLA_PAGE * MLA_D * 4 : 0, (size_t)ldq * MLA_DV * 4,
        (size_t)ldq * 4 * 3, (size_t)ldq * 4, (size_t)16 * MLA_D * 2,
    };
    size_t total = 0;
    for (int i = 0; i < N; i++) total += mla_align(sz[i]);
    if (total > mla_scratch_cap) {
        free(mla_scratch_ptr);
        mla_scratch_ptr = NULL;
        mla_scratch_cap = 0;
        size_t cap = (total + 4095) & ~(size_t)4095;
        if (posix_memalign(&mla_scratch_ptr, 64, cap) != 0) {
            mla_scratch_ptr = NULL;
            return -1;
        }
        mla_scratch_cap = cap;
    }
    char *p = mla_scratch_ptr;
    void *ptrs[N];
    for (int i = 0; i < N; i++) {
        ptrs[i] = p;
        p += mla_align(sz[i]);
    }
    sc->qp = ptrs[0];
    sc->s = ptrs[1];
    sc->kf = ptrs[2];
    sc->o = ptrs[3];
    sc->m = ptrs[4];
    sc->l = sc->m + ldq;
    sc->alpha = sc->l + ldq;
    sc->vis = ptrs[5];
    sc->ktail = ptrs[6];
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* scalar conversions                                                                         */

/* fb_bits, fb_float and the fp16 widening fb_f16_f32 are float_bits.h's */
static inline float mla_bf16_f32(uint16_t h) { return fb_float((uint32_t)h << 16); }

static inline uint16_t mla_f32_bf16(float f) {
    uint32_t u = fb_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t mla_f32_f16(float f) {
    uint32_t u = fb_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;           /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00;          /* rounds to >= 65520: inf */
    if (a >= 0x38800000u) {                              /* normal half (>= 2^-14) */
        uint32_t r = a + 0xfffu + ((a >> 13) & 1u);      /* round to nearest even at bit 13 */
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    if (a < 0x33000000u) return sign;                    /* < 2^-25: rounds to 0 (2^-25 is a tie to even 0) */
    /* subnormal half: value / 2^-24 rounded to nearest even */
    uint32_t e = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)e;                            /* value = man * 2^(e - 150); result = man >> (126 - e) */
    uint32_t res = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (res & 1u))) res++;
    return sign | (uint16_t)res;
}

/* ------------------------------------------------------------------------------------------ */
/* item bookkeeping shared by both paths                                                      */

static inline void mla_pages_of_split(const mla_prob *p, int L, int s, int *p0, int *p1) {
    int pages = (L + MLA_PAGE - 1) / MLA_PAGE;
    *p0 = (int)((long)pages * s / p->nsplit);
    *p1 = (int)((long)pages * (s + 1) / p->nsplit);
}

static inline void mla_decode_item(const mla_prob *p, long id, int *b, int *kvh, int *rbi, int *s) {
    *s = (int)(id % p->nsplit);
    id /= p->nsplit;
    *rbi = (int)(id % p->nrb);
    id /= p->nrb;
    *kvh = (int)(id % p->h_kv);
    *b = (int)(id / p->h_kv);
}

static inline const uint16_t *mla_q_row(const mla_prob *p, int b, int kvh, int ra) {
    int t = ra / p->group, head = kvh * p->group + ra % p->group;
    return (const uint16_t *)p->q + (long)b * p->q_sb + (long)t * p->q_st + (long)head * p->q_sh;
}

static inline int mla_row_vis(const mla_prob *p, int L, int ra) {
    if (!p->causal) return L;
    long v = (long)L - p->s_q + 1 + ra / p->group;
    return v < 0 ? 0 : (v > L ? L : (int)v);
}

/* Page pg of sequence b for KV head kvh, or NULL (and the error flag) when the block id is invalid. */
static inline const uint16_t *mla_page(mla_prob *p, int b, int kvh, int pg) {
    long blk = p->bt[(long)b * p->bt_stride + pg];
    if (blk < 0 || blk >= p->num_blocks) {
        __atomic_store_n(&p->error, MLA_EBLOCK, __ATOMIC_RELAXED);
        return NULL;
    }
    return (const uint16_t *)p->k + blk * p->k_sblk + (long)kvh * p->k_sh;
}

/* Output channel d -> its position in O of the bf16 fast path: per 32 channels the 16 even ones, then the 16 odd ones. */
static inline int mla_vperm(int d) { return (d & ~31) + ((d & 1) ? 16 + (d & 31) / 2 : (d & 31) / 2); }

/* Write rows [0, nrows) of an item: O / l rounded, lse = m + log(l); rows that see no key 0, +inf. */
static void mla_finish_rows(const mla_prob *p, int b, int kvh, int r0, int nrows, const float *O, const float *m, const float *l,
                            const int *vis, int permuted) {
    for (int r = 0; r < nrows; r++) {
        int ra = r0 + r, t = ra / p->group, head = kvh * p->group + ra % p->group;
        uint16_t *o = p->out + (((long)b * p->s_q + t) * p->h_q + head) * MLA_DV;
        float *lse = p->lse + ((long)b * p->h_q + head) * p->s_q + t;
        if (vis[r] == 0) {
            memset(o, 0, MLA_DV * 2);
            *lse = INFINITY;
            continue;
        }
        const float *orow = O + (long)r * MLA_DV;
        float lr = l[r];
        *lse = m[r] + logf(lr);
#if MLA_FAST
        __m512 lv = _mm512_set1_ps(lr);
        __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
        if (permuted) {
            int idx[32];
            for (int d = 0; d < 32; d++) idx[d] = mla_vperm(d);
            i0 = _mm512_loadu_si512(idx);
            i1 = _mm512_loadu_si512(idx + 16);
        }
        for (int c = 0; c < MLA_DV; c += 32) {
            __m512 x0 = _mm512_loadu_ps(orow + c), x1 = _mm512_loadu_ps(orow + c + 16);
            if (permuted) {
                __m512 y0 = _mm512_permutex2var_ps(x0, i0, x1), y1 = _mm512_permutex2var_ps(x0, i1, x1);
                x0 = y0;
                x1 = y1;
            }
            x0 = _mm512_div_ps(x0, lv);
            x1 = _mm512_div_ps(x1, lv);
            if (p->fp16) {
                _mm256_storeu_si256((__m256i *)(o + c), _mm512_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                _mm256_storeu_si256((__m256i *)(o + c + 16), _mm512_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            } else {
                /* round to nearest even in integers (keeps subnormals, as torch does); NaN -> quiet NaN */
                __m512i u0 = _mm512_castps_si512(x0), u1 = _mm512_castps_si512(x1);
                __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
                __m512i r0v = _mm512_add_epi32(_mm512_add_epi32(u0, bias), _mm512_and_si512(_mm512_srli_epi32(u0, 16), one));
                __m512i r1v = _mm512_add_epi32(_mm512_add_epi32(u1, bias), _mm512_and_si512(_mm512_srli_epi32(u1, 16), one));
                __mmask16 n0 = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q), n1 = _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
                __m512i qn = _mm512_set1_epi32(0x00400000);
                r0v = _mm512_mask_mov_epi32(r0v, n0, _mm512_or_si512(u0, qn));
                r1v = _mm512_mask_mov_epi32(r1v, n1, _mm512_or_si512(u1, qn));
                r0v = _mm512_srli_epi32(r0v, 16);
                r1v = _mm512_srli_epi32(r1v, 16);
                _mm256_storeu_si256((__m256i *)(o + c), _mm512_cvtepi32_epi16(r0v));
                _mm256_storeu_si256((__m256i *)(o + c + 16), _mm512_cvtepi32_epi16(r1v));
            }
        }
#else
        (void)permuted;
        for (int d = 0; d < MLA_DV; d++) {
            float x = orow[d] / lr;
            o[d] = p->fp16 ? mla_f32_f16(x) : mla_f32_bf16(x);
        }
#endif
    }
}

/* Store an item's unnormalised state for the combine step. */
static void mla_store_partial(const mla_prob *p, long id, int nrows, const float *O, const float *m, const float *l) {
    float *dst = p->partial + id * (long)p->ldq * (MLA_DV + 2);
    memcpy(dst, O, (size_t)nrows * MLA_DV * 4);
    memcpy(dst + (long)p->ldq * MLA_DV, m, (size_t)nrows * 4);
    memcpy(dst + (long)p->ldq * MLA_DV + p->ldq, l, (size_t)nrows * 4);
}

#if MLA_FAST
/* ------------------------------------------------------------------------------------------ */
/* fast path                                                                                  */

static const uint16_t mla_zero_row[MLA_D] __attribute__((aligned(64)));

/* exp for x <= 89 (and NaN, -inf): n = round(x / ln 2), r = x - n ln 2 (Cody-Waite), Cephes' expf
 * polynomial, 2^n by vscalefps (correctly rounded subnormals; 0 for x <= -105). */
static inline __m512 mla_exp(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-105.0f), x); /* NaN stays NaN (second operand) */
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

#define MLA_INLINE static inline __attribute__((always_inline))

#ifndef MLA_PF_HINT
#define MLA_PF_HINT _MM_HINT_T1 /* the next page goes to L2: L1 holds the current tiles */
#endif

/* After the chunk starting at pair P0: S (+)= acc, times scale after the last chunk; acc zeroed. */
MLA_INLINE void mla_qk_fold(const int RG, const int NK, __m512 acc[3][16], int P0, long ldq, float scale, float *S) {
    const int last = P0 + MLA_QK_CHUNK >= MLA_PAIRS;
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 16
    for (int j = 0; j < NK; j++)
#pragma GCC unroll 4
        for (int g = 0; g < RG; g++) {
            float *dst = S + (long)j * ldq + 16 * g;
            __m512 sum = P0 ? _mm512_add_ps(_mm512_load_ps(dst), acc[g][j]) : acc[g][j];
            _mm512_store_ps(dst, last ? _mm512_mul_ps(sum, sc) : sum);
            acc[g][j] = _mm512_setzero_ps();
        }
}

/* QK, bf16: S[j][g*16 + lane] = scale * (q row . key j) for RG groups of 16 rows and NK keys.
 * qp: packed Q at the first group ([P][ldq] dwords). Keys: CONTIG: rows of 576 from kc, else
 * through kp[j]. Prefetch on the way (one line per step P): CONTIG: 288 lines from pfc, else line
 * P / 16 of row pf[P % 16] (16 rows of 1152 bytes either way). */
MLA_INLINE void mla_qk_bf16(const int RG, const int NK, const int CONTIG, const uint32_t *qp, long ldq, const uint16_t *kc, const uint16_t *const *kp,
                            const char *pfc, const char *const *pf, float scale, float *S) {
    __m512 acc[3][16]; /* fixed sizes (not VLAs): the tile lives in registers */
#pragma GCC unroll 4
    for (int g = 0; g < RG; g++)
#pragma GCC unroll 16
        for (int j = 0; j < NK; j++) acc[g][j] = _mm512_setzero_ps();
    const uint16_t *k[16];
#pragma GCC unroll 16
    for (int j = 0; j < NK; j++) k[j] = CONTIG ? kc + j * MLA_D : kp[j];
    for (int P0 = 0; P0 < MLA_PAIRS; P0 += MLA_QK_CHUNK) {
#pragma GCC unroll 2
        for (int P = P0; P < P0 + MLA_QK_CHUNK; P++) {
            if (CONTIG)
                _mm_prefetch(pfc + 64 * P, MLA_PF_HINT);
            else
                _mm_prefetch(pf[P & 15] + (P >> 4) * 64, MLA_PF_HINT);
            __m512bh qv[3];
#pragma GCC unroll 4
            for (int g = 0; g < RG; g++) qv[g] = (__m512bh)_mm512_load_si512(qp + (long)P * ldq + 16 * g);
#pragma GCC unroll 16
            for (int j = 0; j < NK; j++) {
                const uint16_t *kr = CONTIG ? kc + j * MLA_D : k[j];
                __m512bh kv = (__m512bh)_mm512_set1_epi32((int)*(const mla_u32a *)(kr + 2 * P));
#pragma GCC unroll 4
                for (int g = 0; g < RG; g++) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], qv[g], kv);
            }
        }
        mla_qk_fold(RG, NK, acc, P0, ldq, scale, S);
    }
}

/* QK, fp32 (fp16 inputs): qf [576][ldq] floats at the first group, keys widened: rows of 576 floats
 * from kc; prefetch as the bf16 kernel's non-contiguous form. */
MLA_INLINE void mla_qk_f32(const int RG, const int NK, const float *qf, long ldq, const float *kc, const char *const *pf, float scale, float *S) {
    __m512 acc[3][16];
#pragma GCC unroll 4
    for (int g = 0; g < RG; g++)
#pragma GCC unroll 16
        for (int j = 0; j < NK; j++) acc[g][j] = _mm512_setzero_ps();
    for (int P0 = 0; P0 < MLA_PAIRS; P0 += MLA_QK_CHUNK) {
        for (int P = P0; P < P0 + MLA_QK_CHUNK; P++) {
            _mm_prefetch(pf[P & 15] + (P >> 4) * 64, MLA_PF_HINT);
#pragma GCC unroll 2
            for (int e = 0; e < 2; e++) {
                int d = 2 * P + e;
                __m512 qv[3];
#pragma GCC unroll 4
                for (int g = 0; g < RG; g++) qv[g] = _mm512_load_ps(qf + (long)d * ldq + 16 * g);
#pragma GCC unroll 16
                for (int j = 0; j < NK; j++) {
                    __m512 kv = _mm512_set1_ps(kc[j * MLA_D + d]);
#pragma GCC unroll 4
                    for (int g = 0; g < RG; g++) acc[g][j] = _mm512_fmadd_ps(qv[g], kv, acc[g][j]);
                }
            }
        }
        mla_qk_fold(RG, NK, acc, P0, ldq, scale, S);
    }
}

#ifndef MLA_QK_NK
#define MLA_QK_NK 8
#endif

/* Scores of a page's np keys for all ngroups groups of 16 rows: tiles of 3, 2 or 1 groups by
 * MLA_QK_NK keys (one group alone: 16 keys). A tile's absent keys read zeros (a zero row, or the
 * zero-padded copy of the page's last keys). Each kernel call also prefetches 16 rows of the next
 * page (next, nnext keys; NULL: none). */
static void mla_qk_page(const mla_prob *p, const mla_scratch *sc, const uint16_t *page, int np, const uint16_t *next, int nnext, int ngroups) {
    long ldq = p->ldq, ks = p->k_sslot;
    int contig = ks == MLA_D, nk = ngroups == 1 ? 16 : MLA_QK_NK, pfn = 0;
    if (!next) nnext = 0;
    for (int n0 = 0; n0 < np; n0 += nk) {
        float *S = sc->s + (long)n0 * ldq;
        int valid = np - n0 < nk ? np - n0 : nk;
        const uint16_t *kc = page + n0 * ks;
        const uint16_t *kp[16];
        for (int j = 0; j < nk; j++) kp[j] = j < valid ? page + (n0 + j) * ks : mla_zero_row;
        if (contig && valid < nk && !p->fp16) { /* the sequence's last keys, zero-padded to the tile */
            memcpy(sc->ktail, kc, (size_t)valid * MLA_D * 2);
            memset(sc->ktail + valid * MLA_D, 0, (size_t)(nk - valid) * MLA_D * 2);
            kc = sc->ktail;
        }
        for (int g = 0; g < ngroups;) {
            const char *pf[16], *pfc = pfn < nnext ? (const char *)(next + pfn * ks) : (const char *)sc->qp;
            for (int j = 0; j < 16; j++) pf[j] = pfn + j < nnext ? (const char *)(next + (pfn + j) * ks) : (const char *)mla_zero_row;
            pfn += 16;
            int rg = ngroups == 1 ? 1 : (ngroups - g >= 3 ? 3 : ngroups - g);
            if (p->fp16) {
                const float *qf = (const float *)sc->qp + 16 * g, *kf = sc->kf + n0 * MLA_D;
                if (nk == 16)
                    mla_qk_f32(1, 16, qf, ldq, kf, pf, p->scale, S);
                else if (rg == 3)
                    mla_qk_f32(3, MLA_QK_NK, qf, ldq, kf, pf, p->scale, S + 16 * g);
                else if (rg == 2)
                    mla_qk_f32(2, MLA_QK_NK, qf, ldq, kf, pf, p->scale, S + 16 * g);
                else
                    mla_qk_f32(1, MLA_QK_NK, qf, ldq, kf, pf, p->scale, S + 16 * g);
            } else {
                const uint32_t *qp = (const uint32_t *)sc->qp + 16 * g;
                float *Sg = S + 16 * g;
#define MLA_QK_CALL(RG, NK)                                                      \
    do {                                                                         \
        if (contig)                                                              \
            mla_qk_bf16(RG, NK, 1, qp, ldq, kc, kp, pfc, pf, p->scale, Sg);      \
        else                                                                     \
            mla_qk_bf16(RG, NK, 0, qp, ldq, kc, kp, pfc, pf, p->scale, Sg);      \
    } while (0)
                if (nk == 16)
                    MLA_QK_CALL(1, 16);
                else if (rg == 3)
                    MLA_QK_CALL(3, MLA_QK_NK);
                else if (rg == 2)
                    MLA_QK_CALL(2, MLA_QK_NK);
                else
                    MLA_QK_CALL(1, MLA_QK_NK);
#undef MLA_QK_CALL
            }
            g += rg;
        }
    }
}

/* Online softmax over a page for every group: mask, running max, p = exp(s - m) (in place), l, alpha. */
static void mla_softmax_page(const mla_prob *p, const mla_scratch *sc, int np, int key0, int ngroups) {
    long ldq = p->ldq;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < ngroups; g++) {
        float *S = sc->s + 16 * g;
        __m512i vis = _mm512_load_si512(sc->vis + 16 * g);
        int minvis = _mm512_reduce_min_epi32(vis);
        if (key0 + np > minvis)
            for (int n = 0; n < np; n++) {
                __mmask16 seen = _mm512_cmplt_epi32_mask(_mm512_set1_epi32(key0 + n), vis);
                _mm512_store_ps(S + n * ldq, _mm512_mask_mov_ps(ninf, seen, _mm512_load_ps(S + n * ldq)));
            }
        __m512 pm = _mm512_load_ps(S);
        for (int n = 1; n < np; n++) pm = _mm512_max_ps(pm, _mm512_load_ps(S + n * ldq));
        __m512 mold = _mm512_load_ps(sc->m + 16 * g);
        __m512 mnew = _mm512_max_ps(mold, pm);
        __m512 muse = _mm512_mask_mov_ps(mnew, _mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
        __m512 alpha = mla_exp(_mm512_sub_ps(mold, muse));
        __m512 sum = _mm512_setzero_ps();
        for (int n = 0; n < np; n++) {
            __m512 pv = mla_exp(_mm512_sub_ps(_mm512_load_ps(S + n * ldq), muse));
            sum = _mm512_add_ps(sum, pv);
            _mm512_store_ps(S + n * ldq, pv);
        }
        __m512 l = _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(sc->l + 16 * g), alpha), sum);
        _mm512_store_ps(sc->l + 16 * g, l);
        _mm512_store_ps(sc->m + 16 * g, mnew);
        _mm512_store_ps(sc->alpha + 16 * g, alpha);
    }
}

/* fp16: widen the page's np keys to fp32 (all 576 channels). */
static void mla_widen_page(const mla_prob *p, const mla_scratch *sc, const uint16_t *page, int np) {
    long ks = p->k_sslot;
    for (int n = 0; n < np; n++) {
        const uint16_t *src = page + n * ks;
        float *dst = sc->kf + n * MLA_D;
        for (int c = 0; c < MLA_D; c += 16) _mm512_store_ps(dst + c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + c))));
    }
    if (np < MLA_PAGE) memset(sc->kf + np * MLA_D, 0, (size_t)(MLA_PAGE - np) * MLA_D * 4); /* absent keys of the last tile */
}

/* P . V, bf16 V widened on the fly: O rows [0, RR) x 64 channels, p in S [n][ldq], v rows of the
 * page (stride ks). A zmm of 32 bf16 gives its even channels (<< 16) and its odd ones (& 0xffff0000),
 * so O holds, per 32 channels, the 16 even ones then the 16 odd ones (see mla_finish_rows). */
MLA_INLINE void mla_pv_bf16(const int RR, const float *S, long ldq, const uint16_t *v, long ks, int np, float *O, const float *alpha, int first) {
    __m512 acc[6][4];
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_load_ps(O + r * MLA_DV + 16 * c), a);
    }
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int n = 0; n < np; n++) {
        __m512i x0 = _mm512_loadu_si512(v + n * ks), x1 = _mm512_loadu_si512(v + n * ks + 32);
        __m512 w[4];
        w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(x0, 16));
        w[1] = _mm512_castsi512_ps(_mm512_and_si512(x0, hi));
        w[2] = _mm512_castsi512_ps(_mm512_slli_epi32(x1, 16));
        w[3] = _mm512_castsi512_ps(_mm512_and_si512(x1, hi));
#pragma GCC unroll 8
        for (int r = 0; r < RR; r++) {
            __m512 pb = _mm512_set1_ps(S[n * ldq + r]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(pb, w[c], acc[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) _mm512_store_ps(O + r * MLA_DV + 16 * c, acc[r][c]);
}

/* P . V, fp32 V rows (fp16 path, stride 576). */
MLA_INLINE void mla_pv_f32(const int RR, const float *S, long ldq, const float *vf, int np, float *O, const float *alpha, int first) {
    __m512 acc[6][4];
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_load_ps(O + r * MLA_DV + 16 * c), a);
    }
    for (int n = 0; n < np; n++) {
        __m512 w[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) w[c] = _mm512_load_ps(vf + n * MLA_D + 16 * c);
#pragma GCC unroll 8
        for (int r = 0; r < RR; r++) {
            __m512 pb = _mm512_set1_ps(S[n * ldq + r]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(pb, w[c], acc[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) _mm512_store_ps(O + r * MLA_DV + 16 * c, acc[r][c]);
}

/* O = O * alpha + P . V for the padded rows [0, nrows_pad) (a multiple of 16: tiles of 6, then 4 or 2). */
static void mla_pv_page(const mla_prob *p, const mla_scratch *sc, const uint16_t *page, int np, int nrows_pad, int first) {
    long ldq = p->ldq, ks = p->k_sslot;
    for (int d0 = 0; d0 < MLA_DV; d0 += 64) {
        int r = 0;
        float *O = sc->o + d0;
        if (!p->fp16) {
            for (; r + 6 <= nrows_pad; r += 6) mla_pv_bf16(6, sc->s + r, ldq, page + d0, ks, np, O + r * MLA_DV, sc->alpha + r, first);
            if (nrows_pad - r == 4) mla_pv_bf16(4, sc->s + r, ldq, page + d0, ks, np, O + r * MLA_DV, sc->alpha + r, first);
            if (nrows_pad - r == 2) mla_pv_bf16(2, sc->s + r, ldq, page + d0, ks, np, O + r * MLA_DV, sc->alpha + r, first);
        } else {
            for (; r + 6 <= nrows_pad; r += 6) mla_pv_f32(6, sc->s + r, ldq, sc->kf + d0, np, O + r * MLA_DV, sc->alpha + r, first);
            if (nrows_pad - r == 4) mla_pv_f32(4, sc->s + r, ldq, sc->kf + d0, np, O + r * MLA_DV, sc->alpha + r, first);
            if (nrows_pad - r == 2) mla_pv_f32(2, sc->s + r, ldq, sc->kf + d0, np, O + r * MLA_DV, sc->alpha + r, first);
        }
    }
}

/* Pack the item's Q: bf16 [P][ldq] pair dwords, fp16 [d][ldq] floats; padding rows 0. */
static void mla_pack_q(const mla_prob *p, const mla_scratch *sc, int b, int kvh, int r0, int nrows) {
    long ldq = p->ldq;
    if (!p->fp16) {
        uint32_t *qp = sc->qp;
        for (int r = 0; r < ldq; r++) {
            if (r < nrows) {
                const uint16_t *row = mla_q_row(p, b, kvh, r0 + r);
                for (int P = 0; P < MLA_PAIRS; P++) qp[P * ldq + r] = *(const mla_u32a *)(row + 2 * P);
            } else {
                for (int P = 0; P < MLA_PAIRS; P++) qp[P * ldq + r] = 0;
            }
        }
    } else {
        float *qf = sc->qp;
        for (int r = 0; r < ldq; r++) {
            if (r < nrows) {
                const uint16_t *row = mla_q_row(p, b, kvh, r0 + r);
                float tmp[MLA_D] __attribute__((aligned(64)));
                for (int c = 0; c < MLA_D; c += 16) _mm512_store_ps(tmp + c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + c))));
                for (int d = 0; d < MLA_D; d++) qf[d * ldq + r] = tmp[d];
            } else {
                for (int d = 0; d < MLA_D; d++) qf[d * ldq + r] = 0.0f;
            }
        }
    }
}

static inline int mla_page_keys(int L, int pg) { return L - pg * MLA_PAGE < MLA_PAGE ? L - pg * MLA_PAGE : MLA_PAGE; }

static void mla_item(void *ctx, long idx, int tid) {
    (void)tid;
    mla_prob *p = ctx;
    long id = p->order[idx];
    int b, kvh, rbi, s;
    mla_decode_item(p, id, &b, &kvh, &rbi, &s);
    int L = p->seqlens[b];
    int r0 = rbi * p->rb, nrows = p->rows - r0 < p->rb ? p->rows - r0 : p->rb;
    int ldq = p->ldq, ngroups = (nrows + 15) / 16, nrows_pad = ngroups * 16;
    int pg0, pg1;
    mla_pages_of_split(p, L, s, &pg0, &pg1);
    if (p->nsplit > 1 && pg0 >= pg1) return; /* an empty split: the combine step skips it */
    mla_scratch sc;
    if (mla_get_scratch(ldq, p->fp16, &sc)) {
        __atomic_store_n(&p->error, MLA_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    for (int r = 0; r < ldq; r++) {
        sc.vis[r] = r < nrows ? mla_row_vis(p, L, r0 + r) : L;
        sc.m[r] = -INFINITY;
        sc.l[r] = 0.0f;
    }
    const uint16_t *page = pg0 < pg1 ? mla_page(p, b, kvh, pg0) : NULL;
    if (page) { /* the first page: fetch it while Q is packed */
        int np = mla_page_keys(L, pg0);
        for (int n = 0; n < np; n++)
            for (int c = 0; c < MLA_D; c += 32) _mm_prefetch((const char *)(page + n * p->k_sslot + c), _MM_HINT_T0);
    }
    if (pg0 < pg1) mla_pack_q(p, &sc, b, kvh, r0, nrows);
    for (int pg = pg0; pg < pg1; pg++) {
        if (!page) return;
        const uint16_t *next = pg + 1 < pg1 ? mla_page(p, b, kvh, pg + 1) : NULL;
        int key0 = pg * MLA_PAGE, np = mla_page_keys(L, pg);
        if (p->fp16) mla_widen_page(p, &sc, page, np);
        mla_qk_page(p, &sc, page, np, next, next ? mla_page_keys(L, pg + 1) : 0, ngroups);
        mla_softmax_page(p, &sc, np, key0, ngroups);
        mla_pv_page(p, &sc, page, np, nrows_pad, pg == pg0);
        page = next;
    }
    if (pg0 >= pg1) memset(sc.o, 0, (size_t)nrows * MLA_DV * 4);
    if (p->nsplit > 1)
        mla_store_partial(p, id, nrows, sc.o, sc.m, sc.l);
    else
        mla_finish_rows(p, b, kvh, r0, nrows, sc.o, sc.m, sc.l, sc.vis, !p->fp16);
}

#else /* !MLA_FAST */
/* ------------------------------------------------------------------------------------------ */
/* portable path: the same item structure in plain C (fp32 products and sums, libm expf)      */

static inline float mla_load(const mla_prob *p, const uint16_t *x) { return p->fp16 ? fb_f16_f32(*x) : mla_bf16_f32(*x); }

static void mla_item(void *ctx, long idx, int tid) {
    (void)tid;
    mla_prob *p = ctx;
    long id = p->order[idx];
    int b, kvh, rbi, s;
    mla_decode_item(p, id, &b, &kvh, &rbi, &s);
    int L = p->seqlens[b];
    int r0 = rbi * p->rb, nrows = p->rows - r0 < p->rb ? p->rows - r0 : p->rb;
    int ldq = p->ldq;
    int pg0, pg1;
    mla_pages_of_split(p, L, s, &pg0, &pg1);
    if (p->nsplit > 1 && pg0 >= pg1) return;
    mla_scratch sc;
    if (mla_get_scratch(ldq, 1, &sc)) {
        __atomic_store_n(&p->error, MLA_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    float *qf = sc.qp; /* [row][576] */
    for (int r = 0; r < nrows; r++) {
        sc.vis[r] = mla_row_vis(p, L, r0 + r);
        sc.m[r] = -INFINITY;
        sc.l[r] = 0.0f;
        const uint16_t *row = mla_q_row(p, b, kvh, r0 + r);
        for (int d = 0; d < MLA_D; d++) qf[r * MLA_D + d] = mla_load(p, row + d);
    }
    memset(sc.o, 0, (size_t)nrows * MLA_DV * 4);
    for (int pg = pg0; pg < pg1; pg++) {
        const uint16_t *page = mla_page(p, b, kvh, pg);
        if (!page) return;
        int key0 = pg * MLA_PAGE, np = L - key0 < MLA_PAGE ? L - key0 : MLA_PAGE;
        for (int n = 0; n < np; n++)
            for (int d = 0; d < MLA_D; d++) sc.kf[n * MLA_D + d] = mla_load(p, page + n * p->k_sslot + d);
        for (int r = 0; r < nrows; r++) {
            float *S = sc.s + r * MLA_PAGE; /* [row][key] here */
            float mx = -INFINITY;
            for (int n = 0; n < np; n++) {
                float acc = 0.0f;
                for (int d0 = 0; d0 < MLA_D; d0 += 2 * MLA_QK_CHUNK) {
                    float part = 0.0f;
                    for (int d = d0; d < d0 + 2 * MLA_QK_CHUNK; d++) part += qf[r * MLA_D + d] * sc.kf[n * MLA_D + d];
                    acc += part;
                }
                S[n] = key0 + n < sc.vis[r] ? acc * p->scale : -INFINITY;
                if (mx == mx && !(S[n] <= mx)) mx = S[n]; /* NaN-propagating max */
            }
            float mold = sc.m[r], mnew = (mold != mold || !(mx <= mold)) ? mx : mold;
            float muse = mnew == -INFINITY ? 0.0f : mnew;
            float alpha = expf(mold - muse), sum = 0.0f;
            for (int n = 0; n < np; n++) {
                S[n] = expf(S[n] - muse);
                sum += S[n];
            }
            sc.l[r] = sc.l[r] * alpha + sum;
            sc.m[r] = mnew;
            float *o = sc.o + r * MLA_DV;
            for (int d = 0; d < MLA_DV; d++) {
                float acc = o[d] * alpha;
                for (int n = 0; n < np; n++) acc += S[n] * sc.kf[n * MLA_D + d];
                o[d] = acc;
            }
        }
    }
    if (p->nsplit > 1)
        mla_store_partial(p, id, nrows, sc.o, sc.m, sc.l);
    else
        mla_finish_rows(p, b, kvh, r0, nrows, sc.o, sc.m, sc.l, sc.vis, 0);
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* combine of the splits (item = sequence, KV head, row block)                                */

static void mla_combine(void *ctx, long idx, int tid) {
    (void)tid;
    mla_prob *p = ctx;
    long base = idx * p->nsplit;
    int b, kvh, rbi, s;
    mla_decode_item(p, base, &b, &kvh, &rbi, &s);
    int L = p->seqlens[b];
    int r0 = rbi * p->rb, nrows = p->rows - r0 < p->rb ? p->rows - r0 : p->rb;
    int ldq = p->ldq;
    mla_scratch sc;
    if (mla_get_scratch(ldq, 0, &sc)) {
        __atomic_store_n(&p->error, MLA_ENOMEM, __ATOMIC_RELAXED);
        return;
    }
    long stride = (long)ldq * (MLA_DV + 2);
    for (int r = 0; r < nrows; r++) {
        sc.vis[r] = mla_row_vis(p, L, r0 + r);
        float M = -INFINITY;
        for (s = 0; s < p->nsplit; s++) {
            int a, e;
            mla_pages_of_split(p, L, s, &a, &e);
            if (a >= e) continue;
            float ms = p->partial[(base + s) * stride + (long)ldq * MLA_DV + r];
            if (ms != ms || !(ms <= M)) M = ms;
        }
        float muse = M == -INFINITY ? 0.0f : M, l = 0.0f;
        float *o = sc.o + (long)r * MLA_DV;
        memset(o, 0, MLA_DV * 4);
        for (s = 0; s < p->nsplit; s++) {
            int a, e;
            mla_pages_of_split(p, L, s, &a, &e);
            if (a >= e) continue;
            const float *part = p->partial + (base + s) * stride;
            float f = expf(part[(long)ldq * MLA_DV + r] - muse);
            l += part[(long)ldq * MLA_DV + ldq + r] * f;
            const float *po = part + (long)r * MLA_DV;
            for (int d = 0; d < MLA_DV; d++) o[d] += po[d] * f;
        }
        sc.m[r] = M;
        sc.l[r] = l;
    }
    mla_finish_rows(p, b, kvh, r0, nrows, sc.o, sc.m, sc.l, sc.vis, MLA_FAST && !p->fp16);
}

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                               */

const char *hal_mla_path(void) { return MLA_FAST ? "avx512_bf16" : "portable C"; }

static __thread float *mla_partial_buf;
static __thread size_t mla_partial_cap;

/* Decode. Strides are in elements; q and k_cache have a contiguous last dimension; out
 * [batch, s_q, h_q, 512] and lse [batch, h_q, s_q] contiguous. Returns 0, or MLA_E* on error. */
int hal_mla_decode(const void *q, int64_t q_sb, int64_t q_st, int64_t q_sh, const void *k_cache, int64_t k_sblk, int64_t k_sslot, int64_t k_sh,
                   int64_t num_blocks, const int32_t *block_table, int64_t bt_stride, int64_t max_pages, const int32_t *cache_seqlens, void *out,
                   float *lse, int batch, int s_q, int h_q, int h_kv, float scale, int causal, int fp16, int flags, int nthreads) {
    if (batch < 0 || s_q < 0 || h_q < 0 || h_kv < 1 || h_q % h_kv) return MLA_ESHAPE;
    if (batch == 0 || s_q == 0 || h_q == 0) return MLA_OK;
    for (int b = 0; b < batch; b++)
        if (cache_seqlens[b] < 0 || (int64_t)cache_seqlens[b] > max_pages * MLA_PAGE) return MLA_ESEQLEN;
    mla_prob p;
    memset(&p, 0, sizeof p);
    p.q = q;
    p.q_sb = q_sb;
    p.q_st = q_st;
    p.q_sh = q_sh;
    p.k = k_cache;
    p.k_sblk = k_sblk;
    p.k_sslot = k_sslot;
    p.k_sh = k_sh;
    p.num_blocks = num_blocks;
    p.bt = block_table;
    p.bt_stride = bt_stride;
    p.max_pages = max_pages;
    p.seqlens = cache_seqlens;
    p.out = out;
    p.lse = lse;
    p.batch = batch;
    p.s_q = s_q;
    p.h_q = h_q;
    p.h_kv = h_kv;
    p.group = h_q / h_kv;
    p.rows = s_q * p.group;
    p.nrb = (p.rows + MLA_RB_MAX - 1) / MLA_RB_MAX;
    p.rb = (p.rows + p.nrb - 1) / p.nrb;
    p.ldq = (p.rb + 15) / 16 * 16;
    p.scale = scale;
    p.causal = causal != 0 && s_q > 1;
    p.fp16 = fp16 != 0;
    if (nthreads < 1) nthreads = 1;
    long base = (long)batch * h_kv * p.nrb;
    int longest = 0;
    for (int b = 0; b < batch; b++)
        if (cache_seqlens[b] > longest) longest = cache_seqlens[b];
    int max_pages_used = (longest + MLA_PAGE - 1) / MLA_PAGE;
    int nsplit = (flags >> 8) & 0xff;
    if (nsplit <= 0) {
        nsplit = 1;
        if (nthreads > 1 && base < 2L * nthreads) {
            nsplit = (int)((2L * nthreads + base - 1) / base);
            int cap = max_pages_used / 2; /* at least two pages per split */
            if (nsplit > cap) nsplit = cap;
            if (nsplit > MLA_MAX_SPLITS) nsplit = MLA_MAX_SPLITS;
            if (nsplit < 1) nsplit = 1;
        }
    }
    p.nsplit = nsplit;
    long nitems = base * nsplit;
    p.order = malloc((size_t)nitems * sizeof(long));
    long *keys = malloc((size_t)nitems * sizeof(long));
    if (!p.order || !keys) {
        free(p.order);
        free(keys);
        return MLA_ENOMEM;
    }
    /* longest work first (counting sort on pages of the item's split, stable by id) */
    int maxw = 0;
    for (long id = 0; id < nitems; id++) {
        int b, kvh, rbi, s, a, e;
        mla_decode_item(&p, id, &b, &kvh, &rbi, &s);
        mla_pages_of_split(&p, cache_seqlens[b], s, &a, &e);
        keys[id] = e - a;
        if (e - a > maxw) maxw = e - a;
    }
    long *count = calloc((size_t)maxw + 2, sizeof(long));
    if (!count) {
        free(p.order);
        free(keys);
        return MLA_ENOMEM;
    }
    for (long id = 0; id < nitems; id++) count[maxw - keys[id] + 1]++;
    for (int w = 1; w <= maxw + 1; w++) count[w] += count[w - 1];
    for (long id = 0; id < nitems; id++) p.order[count[maxw - keys[id]]++] = id;
    free(count);
    free(keys);
    if (nsplit > 1) { /* kept per calling thread: no page faults on every call */
        size_t bytes = (size_t)nitems * p.ldq * (MLA_DV + 2) * sizeof(float);
        if (bytes > mla_partial_cap) {
            free(mla_partial_buf);
            mla_partial_cap = 0;
            mla_partial_buf = malloc(bytes);
            if (!mla_partial_buf) {
                free(p.order);
                return MLA_ENOMEM;
            }
            mla_partial_cap = bytes;
        }
        p.partial = mla_partial_buf;
    }
    parallel_for(mla_item, &p, nitems, nthreads);
    if (nsplit > 1 && !p.error) parallel_for(mla_combine, &p, base, nthreads);
    free(p.order);
    return p.error;
}
