"""DeepSeek-V3.2 on OpenCL: sparse MLA (decode with the FP8 cache, sinks, an extra cache; the
sparse prefill), the FP8 cache quantiser, and the indexer logits.

``mla_sparse``: a work-group takes up to 64 query heads of one token (and one KV head) and walks the
token's index lists KEYS entries at a time: gather each named key into local memory (FP8 codes
times their tile's power-of-two scale, or bf16/fp16; an unused entry is zeros, never read, so a
NaN in a slot nobody names cannot leak), scores in registers, the online softmax with a
NaN-propagating max, ``O = alpha * O + P @ V``. A row is empty when no entry of its lists is valid
(out 0, lse +inf), decided by the count of valid keys, never by the softmax sum. The sink scales
``out`` by ``1 / (1 + exp(sink - lse))``. The dense V3.2 mode runs through the same kernel over
each token's causal window, listed on the host.

``mqa_logits`` / ``paged_mqa_logits``: a work-group holds one query row's heads, decoded, in local
memory; each work-item owns one key: decodes its D codes once, then for every head the dot product
(fp32), times the key's scale, relu (NaN kept), times the head weight, summed.

``quantize_mla_kv_cache``: one work-item per (token, 128-value tile): NaN-propagating amax, the
scale rounded up to a power of two from its float32 bits, exact division, the bit-exact e4m3
encoder; rope values to bf16 (round to nearest even).

Semantics: :mod:`hal.ops.mla_v2_reference`, :mod:`hal.ops.indexer_reference`,
:mod:`hal.ops.mla_fp8_cache`. FP8 and bf16 are carried as bits (OpenCL C 1.2, no cl_khr_fp16).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hal.backends.opencl.buffers import bind
from hal.backends.opencl.device import runtime
from hal.backends.opencl.numeric import NUMERIC_SOURCE
from hal.backends.opencl.program import build
from hal.ops.mla_fp8_cache import MODEL1_DATA_BYTES, MODEL1_DIM, MODEL1_TOKEN_BYTES, model1_pages
from hal.ops.mla_v2 import dense_window_indices

__all__ = ["mla_decode_v2", "mla_sparse_prefill", "quantize_mla_kv_cache", "mqa_logits", "paged_mqa_logits"]

_ELEMENT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
INT_MAX = 2**31 - 1

SPARSE_SOURCE = NUMERIC_SOURCE + r"""
/* ROWS heads per work-group, KEYS list entries per step, WG work-items, FP8 1 for the 656-byte
   cache, 2 for the MODEL1 pages (else ELEMENT 0 bf16 / 1 fp16 keys), OUT_ELEMENT 0 bf16 / 1 fp16
   outputs. */
/* D: the key width (576 = 512 NoPE + 64 RoPE, or 512 where V is the whole key); set per build. */
#ifndef D
#define D 576
#endif
#define DV 512
#define D16 (D / 16)
#define DV16 (DV / 16)
#define SLICES (DV16 / WG)
#if Q_ELEMENT == 1
#define LOAD_Q16(p) fp16x16_to_float(vload16(0, p))
#else
#define LOAD_Q16(p) bf16x16_to_float(vload16(0, p))
#endif

inline float hsum16(float16 v) {
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}

/* 16 channels (c of D / 16) of the key in `slot` of the page at byte address `block` */
inline float16 load_key16(__global const uchar* block, int slot, long stride_slot, int page, int c) {
#if FP8 == 2
    /* MODEL1: the page holds every token's 576 data bytes (448 e4m3, then 64 bf16), then every
       token's 8 scale bytes (7 UE8M0 exponents, one per 64 codes: 2^(e - 127), 255 NaN) */
    __global const uchar* key = block + (long)slot * 576;
    if (c < 28) {
        const uint e = block[(long)page * 576 + (long)slot * 8 + c / 4];
        const float s = e == 255u ? NAN : e == 0u ? as_float(0x00400000u) : as_float(e << 23);   /* 2^-127 is subnormal */
        return e4m3x16_to_float(vload16(0, key + c * 16)) * s;
    }
    return bf16x16_to_float(vload16(0, (__global const ushort*)(key + 448) + (c - 28) * 16));
#else
    __global const uchar* key = block + (long)slot * stride_slot;
#endif
#if FP8 == 1
    if (c < 32) return e4m3x16_to_float(vload16(0, key + c * 16)) * ((__global const float*)(key + 512))[c / 8];
    return bf16x16_to_float(vload16(0, (__global const ushort*)(key + 528) + (c - 32) * 16));
#elif FP8 == 0 && ELEMENT == 1
    return fp16x16_to_float(vload16(0, (__global const ushort*)key + c * 16));
#elif FP8 == 0
    return bf16x16_to_float(vload16(0, (__global const ushort*)key + c * 16));
#endif
}

inline void store_out(__global ushort* dst, float16 o) {
    ushort lanes[16];
    const float* v = (const float*)&o;
#if OUT_ELEMENT == 1
    for (int e = 0; e < 16; ++e) lanes[e] = float_to_fp16(v[e]);
#else
    for (int e = 0; e < 16; ++e) lanes[e] = float_to_bf16(v[e]);
#endif
    vstore16(*(ushort16*)lanes, 0, dst);
}

/* One index list: `topk` entries at idx (the first `length` count); entry p is valid when
   0 <= p < limit; key p lives at cache + (p / page) * stride_block + (p % page) * stride_slot. */
typedef struct { long idx; int length, topk, limit, page; long stride_block, stride_slot; } List;

/* Grid: (WG * tokens, head blocks, h_kv). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void mla_sparse(
    __global const ushort* q, long stride_qt, long stride_qh,
    __global const int* idx, long stride_it, long stride_ig, __global const int* lens, int len_div, int topk, int limit,
    __global const uchar* cache, int page, long stride_block, long stride_slot, long stride_head,
    __global const int* x_idx, long x_stride_it, __global const int* x_lens, int x_topk,
    __global const uchar* x_cache, int x_page, long x_stride_block, long x_stride_slot,
    int has_len, int has_extra, int has_x_len, __global const float* sink, int has_sink,
    __global ushort* out, long stride_ot, long stride_oh,
    __global float* lse, int lse_div, long stride_l0, long stride_l1, long stride_lh,
    __global float* max_logits, int has_max, int h_q, int group, float scale_log2)
{
    __local float16 Qs[ROWS * D16];
    __local float16 Ks[KEYS * D16];
    __local float P[ROWS * KEYS];
    __local int valid[KEYS];
    __local float row_max[ROWS], row_sum[ROWS], row_alpha[ROWS];

    const int lid = get_local_id(0);
    const int t = get_group_id(0), g = get_group_id(2);
    const int h0 = g * group + get_group_id(1) * ROWS;
    const int rows = min(ROWS, g * group + group - h0);

    for (int i = lid; i < ROWS * D16; i += WG) {
        const int r = i / D16, c = i % D16;
        Qs[i] = r < rows ? LOAD_Q16(q + t * stride_qt + (long)(h0 + r) * stride_qh + c * 16) * scale_log2 : (float16)0.0f;
    }
    for (int r = lid; r < ROWS; r += WG) { row_max[r] = -INFINITY; row_sum[r] = 0.0f; }
    float16 acc[SLICES][ROWS];
    for (int u = 0; u < SLICES; ++u)
        for (int r = 0; r < ROWS; ++r) acc[u][r] = 0.0f;
    int seen = 0;   /* valid keys so far (the same count in every work-item) */

    for (int list = 0; list < 1 + has_extra; ++list) {
        __global const int* entries = list == 0 ? idx + t * stride_it + g * stride_ig : x_idx + t * x_stride_it;
        __global const uchar* base = list == 0 ? cache + g * stride_head : x_cache;
        const int n = list == 0 ? topk : x_topk;
        const int length = list == 0 ? (has_len ? lens[t / len_div] : n) : (has_x_len ? x_lens[t / len_div] : n);
        const int lim = list == 0 ? limit : INT_MAX;
        const int pg = list == 0 ? page : x_page;
        const long sb = list == 0 ? stride_block : x_stride_block, ss = list == 0 ? stride_slot : x_stride_slot;
        for (int j0 = 0; j0 < length; j0 += KEYS) {
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int j = lid; j < KEYS; j += WG) {
                const int p = j0 + j < length ? entries[j0 + j] : -1;
                valid[j] = p >= 0 && p < lim ? 1 : 0;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int i = lid; i < KEYS * D16; i += WG) {
                const int j = i / D16, c = i % D16;
                float16 k = 0.0f;
                if (valid[j]) {
                    const int p = entries[j0 + j];
                    k = load_key16(base + (long)(p / pg) * sb, p % pg, ss, pg, c);
                }
                Ks[i] = k;
            }
            int fresh = 0;
            for (int j = 0; j < KEYS; ++j) fresh += valid[j];
            seen += fresh;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int i = lid; i < ROWS * KEYS; i += WG) {
                const int r = i / KEYS, j = i % KEYS;
                float16 s = 0.0f;
                for (int c = 0; c < D16; ++c) s += Qs[r * D16 + c] * Ks[j * D16 + c];
                P[i] = valid[j] ? hsum16(s) : -INFINITY;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int r = lid; r < ROWS; r += WG) {
                const float old_max = row_max[r];
                float m = old_max;
                for (int j = 0; j < KEYS; ++j) { const float x = P[r * KEYS + j]; m = (x > m || isnan(x)) ? x : m; }
                float sum = 0.0f;
                for (int j = 0; j < KEYS; ++j) {
                    const float p = m == -INFINITY ? 0.0f : exp2(P[r * KEYS + j] - m);
                    P[r * KEYS + j] = p;
                    sum += p;
                }
                const float alpha = m == -INFINITY ? 1.0f : exp2(old_max - m);
                row_max[r] = m;
                row_sum[r] = row_sum[r] * alpha + sum;
                row_alpha[r] = alpha;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int u = 0, c = lid; c < DV16; ++u, c += WG)
                for (int r = 0; r < ROWS; ++r) {
                    float16 o = acc[u][r] * row_alpha[r];
                    for (int j = 0; j < KEYS; ++j) o += P[r * KEYS + j] * Ks[j * D16 + c];
                    acc[u][r] = o;
                }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int r = 0; r < rows; ++r) {
        const int h = h0 + r;
        const float l = row_sum[r];
        const float value = seen > 0 ? (row_max[r] + log2(l)) * M_LN2_F : INFINITY;
        float factor = 1.0f;
        if (has_sink && seen > 0) factor = 1.0f / (1.0f + exp(sink[h] - value));
        for (int u = 0, c = lid; c < DV16; ++u, c += WG)
            store_out(out + t * stride_ot + (long)h * stride_oh + c * 16, seen > 0 ? acc[u][r] / l * factor : (float16)0.0f);
        if (lid != 0) continue;
        lse[(long)(t / lse_div) * stride_l0 + (long)(t % lse_div) * stride_l1 + (long)h * stride_lh] = value;
        if (has_max) max_logits[(long)t * h_q + h] = seen > 0 ? row_max[r] * M_LN2_F : -INFINITY;
    }
}
"""

QUANTIZE_SOURCE = NUMERIC_SOURCE + r"""
/* ELEMENT 0 bf16 / 1 fp16 / 2 fp32 input, contiguous [tokens, 576]. Grid: (tokens, 5): tiles 0..3, 4 = rope. */
inline float load_x(__global const uchar* x, long i) {
#if ELEMENT == 2
    return ((__global const float*)x)[i];
#elif ELEMENT == 1
    return fp16_to_float(((__global const ushort*)x)[i]);
#else
    return bf16_to_float(((__global const ushort*)x)[i]);
#endif
}

__kernel void quantize_mla_kv_cache(__global const uchar* x, __global uchar* out)
{
    const long token = get_global_id(0);
    const int part = get_global_id(1);
    __global uchar* record = out + token * 656;
    if (part == 4) {
        __global ushort* rope = (__global ushort*)(record + 528);
        for (int i = 0; i < 64; ++i) rope[i] = float_to_bf16(load_x(x, token * 576 + 512 + i));
        return;
    }
    const long first = token * 576 + part * 128;
    float amax = 0.0f;
    for (int i = 0; i < 128; ++i) {
        const float v = fabs(load_x(x, first + i));
        amax = (v > amax || isnan(v)) ? v : amax;   /* NaN-propagating */
    }
    float s = amax / 448.0f;   /* correctly rounded where the device offers it (build option) */
    s = isnan(s) ? s : fmax(s, 1e-4f);
    const uint bits = as_uint(s), exponent = bits & 0x7F800000u;
    const float scale = exponent == 0x7F800000u ? s : as_float((bits & 0x7FFFFFu) == 0u ? exponent : exponent + 0x800000u);
    const float inverse = 1.0f / scale;   /* exact: a power of two */
    for (int i = 0; i < 128; ++i) record[part * 128 + i] = float_to_e4m3(load_x(x, first + i) * inverse);
    ((__global float*)(record + 512))[part] = scale;
}
"""

INDEXER_SOURCE = NUMERIC_SOURCE + r"""
/* H heads, D head dim (32/64/128), OUT_BF16 1 for bf16 logits, W_BF16 1 for bf16 weights.
   q: e4m3 [rows, H, D]; keys: e4m3 codes at key_base(p), scales float. Grid: (KEYS * key blocks, rows). */
#define D16 (D / 16)

inline void store_logit(__global uchar* out, long i, float v) {
#if OUT_BF16
    ((__global ushort*)out)[i] = float_to_bf16(v);
#else
    ((__global float*)out)[i] = v;
#endif
}

inline float load_weight(__global const uchar* w, long i) {
#if W_BF16
    return bf16_to_float(((__global const ushort*)w)[i]);
#else
    return ((__global const float*)w)[i];
#endif
}

/* Σ_h relu((q_h · k) * scale) * w_h for the key in kv[], q rows of this row in Qs */
inline float row_logit(__local const float16* Qs, const float16* kv, float scale, __global const uchar* w, long w_row) {
    float total = 0.0f;
    for (int h = 0; h < H; ++h) {
        float16 s = 0.0f;
        for (int c = 0; c < D16; ++c) s += Qs[h * D16 + c] * kv[c];
        const float8 a = s.lo + s.hi;
        const float4 b = a.lo + a.hi;
        const float2 d = b.lo + b.hi;
        const float x = (d.x + d.y) * scale;
        total += (isnan(x) ? x : fmax(x, 0.0f)) * load_weight(w, w_row + h);
    }
    return total;
}

__kernel void mqa_logits(
    __global const uchar* q, __global const uchar* k, __global const float* sf, __global const uchar* w,
    __global const int* start, __global const int* end, __global uchar* out, int seq_len_kv, int width, int compressed)
{
    __local float16 Qs[H * D16];
    const int row = get_global_id(1), lid = get_local_id(0);
    for (int i = lid; i < H * D16; i += get_local_size(0)) Qs[i] = e4m3x16_to_float(vload16(0, q + ((long)row * H * D) + i * 16));
    barrier(CLK_LOCAL_MEM_FENCE);
    const int column = get_global_id(0);
    if (column >= width) return;
    const int s = start[row], e = end[row];
    const int key = compressed ? s + column : column;
    float logit = -INFINITY;
    if (key >= s && key < e) {
        float16 kv[D16];
        for (int c = 0; c < D16; ++c) kv[c] = e4m3x16_to_float(vload16(0, k + (long)key * D + c * 16));
        logit = row_logit(Qs, kv, sf[key], w, (long)row * H);
    }
    store_logit(out, (long)row * width + column, logit);
}

/* cache: [num_blocks, block_kv * (D + 4)] bytes, contiguous; rows (b, j) = b * next_n + j */
__kernel void paged_mqa_logits(
    __global const uchar* q, __global const uchar* cache, __global const uchar* w, __global const int* lens,
    __global const int* table, __global uchar* out, int next_n, int max_context_len, int block_kv, int max_blocks, int lens_2d)
{
    __local float16 Qs[H * D16];
    const int row = get_global_id(1), lid = get_local_id(0), b = row / next_n, j = row % next_n;
    for (int i = lid; i < H * D16; i += get_local_size(0)) Qs[i] = e4m3x16_to_float(vload16(0, q + ((long)row * H * D) + i * 16));
    barrier(CLK_LOCAL_MEM_FENCE);
    const int p = get_global_id(0);
    if (p >= max_context_len) return;
    const int visible = lens_2d ? lens[row] : lens[b] - next_n + 1 + j;
    float logit = -INFINITY;
    if (p < visible) {
        const long block = table[(long)b * max_blocks + p / block_kv];
        __global const uchar* page = cache + block * block_kv * (D + 4);
        const int slot = p % block_kv;
        float16 kv[D16];
        for (int c = 0; c < D16; ++c) kv[c] = e4m3x16_to_float(vload16(0, page + (long)slot * D + c * 16));
        logit = row_logit(Qs, kv, ((__global const float*)(page + block_kv * D))[slot], w, (long)row * H);
    }
    store_logit(out, (long)row * max_context_len + p, logit);
}
"""

ROWS, KEYS, WG = 64, 16, 8  # ROWS: the most heads per work-group (see _rows)


def _rows(group: int, d: int, local_mem_size: int) -> int:
    """Heads per work-group for ``group`` query heads per KV head: all of them up to ROWS, in steps of
    16, so each gathered key is decoded once for as many heads as possible (top-2048 on a 2-core
    CPU, alternated runs: 64 rows took 0.78-0.87x the time of 16 at h_q = 64 and 128), a small group
    computes no empty rows, and the tiles fit the device's local memory (16 at least, as before)."""
    rows = min(ROWS, -(-group // 16) * 16)
    while rows > 16 and _local_bytes(rows, d) > local_mem_size:
        rows -= 16
    return rows


def _local_bytes(rows: int, d: int) -> int:
    """``mla_sparse``'s local memory for ``rows`` heads and ``d``-wide keys (Qs, Ks, P and the row state)."""
    return (rows + KEYS) * d * 4 + rows * KEYS * 4 + KEYS * 4 + rows * 12
LOGIT_KEYS = 64


def _sparse(
    q: torch.Tensor, lists: tuple, extra: tuple | None, sink: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
    lse_layout: tuple[int, int, int, int], max_logits: torch.Tensor | None, *, tokens: int, h_q: int, h_kv: int, fp8: int,
    key_element: int, scale: float, len_div: int,
) -> None:
    """Launch ``mla_sparse``. ``lists`` = (idx, stride_it, stride_ig, lens, topk, limit, cache, page, stride_block, stride_slot, stride_head);
    ``fp8``: 0 bf16/fp16 keys, 1 the 656-byte cache, 2 the MODEL1 pages."""
    rt = runtime()
    group = h_q // h_kv
    rows = _rows(group, q.shape[-1], rt.local_mem_size)
    program = build(rt, "mla_sparse", SPARSE_SOURCE, {
        "ROWS": rows, "KEYS": KEYS, "WG": WG, "FP8": int(fp8), "ELEMENT": key_element,
        "OUT_ELEMENT": _ELEMENT[out.dtype], "Q_ELEMENT": _ELEMENT[q.dtype], "D": q.shape[-1],
    })
    idx, stride_it, stride_ig, lens, topk, limit, cache, page, stride_block, stride_slot, stride_head = lists
    i64, i32 = np.int64, np.int32
    with bind(rt, "mla_sparse") as io:
        cache_buf = io.input(cache)
        x_idx, x_stride, x_lens, x_topk, x_cache, x_page, x_block, x_slot = extra or (idx, stride_it, None, 0, None, 1, 0, 0)
        args = [
            io.input(q), i64(q.stride(-3) if q.dim() == 3 else q.stride(1)), i64(q.stride(-2)),
            io.input(idx), i64(stride_it), i64(stride_ig), io.input(lens if lens is not None else idx), i32(len_div), i32(topk), i32(limit),
            cache_buf, i32(page), i64(stride_block), i64(stride_slot), i64(stride_head),
            io.input(x_idx), i64(x_stride), io.input(x_lens if x_lens is not None else idx), i32(x_topk),
            io.input(x_cache) if x_cache is not None else cache_buf, i32(x_page), i64(x_block), i64(x_slot),
            i32(lens is not None), i32(extra is not None), i32(x_lens is not None),
            io.input(sink if sink is not None else torch.zeros(1)), i32(sink is not None),
            io.output(out), i64(out.stride(-3) if out.dim() == 3 else out.stride(1)), i64(out.stride(-2)),
            io.output(lse), i32(lse_layout[0]), i64(lse_layout[1]), i64(lse_layout[2]), i64(lse_layout[3]),
            io.output(max_logits) if max_logits is not None else io.scratch(4), i32(max_logits is not None),
            i32(h_q), i32(group), np.float32(scale * math.log2(math.e)),
        ]
        program.launch("mla_sparse", (WG * tokens, -(-group // rows), h_kv), (WG, 1, 1), *args)


def _fp8_layout(cache: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The cache's bytes (contiguous), page size, and the byte stride of a block."""
    raw = cache.contiguous().view(torch.uint8)
    return raw, cache.shape[1], cache.shape[1] * cache.shape[-1]


def _model1_layout(cache: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The MODEL1 pages' bytes in place (one flat span from the first page's start to the last's
    end: pages may be padded, never copied), page size, and the byte stride of a page."""
    pages = model1_pages(cache)  # [blocks, page * 584] bytes, rows at the cache's block stride
    blocks, page = cache.shape[:2]
    span = (blocks - 1) * pages.stride(0) + page * MODEL1_TOKEN_BYTES if blocks else 0
    return pages.as_strided((span,), (1,), pages.storage_offset()), page, pages.stride(0)


def mla_decode_v2(
    q, k_cache, block_table, cache_seqlens, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
    extra_k_cache, extra_indices, topk_length, extra_topk_length,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The V3.2 decode (validated by ``hal.ops.mla_v2``); the dense mode as each token's causal window;
    512-wide queries over the MODEL1 pages (V the whole key)."""
    batch, s_q, h_q, d_qk = q.shape
    model1 = is_fp8_kvcache and d_qk == MODEL1_DIM
    h_kv = k_cache.shape[2]
    if indices is None:
        indices = dense_window_indices(block_table, cache_seqlens, s_q, k_cache.shape[1], causal and s_q > 1)
    q = q.contiguous()
    out = torch.empty(batch, s_q, h_q, 512, dtype=q.dtype)
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    indices = indices.contiguous()
    topk = indices.shape[2]

    def cache_args(cache):
        if model1:
            raw, page, block = _model1_layout(cache)
            return raw, page, block, MODEL1_DATA_BYTES
        if is_fp8_kvcache:
            raw, page, block = _fp8_layout(cache)
            return raw, page, block, 656
        cache = cache.contiguous()
        item = cache.element_size()
        return cache.view(torch.uint8), cache.shape[1], cache.stride(0) * item, cache.stride(1) * item

    raw, page, block, slot = cache_args(k_cache)
    head = 0 if is_fp8_kvcache else k_cache.contiguous().stride(2) * k_cache.element_size()
    lists = (indices, topk, 0, topk_length, topk, INT_MAX, raw, page, block, slot, head)
    extra = None
    if extra_k_cache is not None:
        x_raw, x_page, x_block, x_slot = cache_args(extra_k_cache)
        extra_indices = extra_indices.contiguous()
        extra = (extra_indices, extra_indices.shape[2], extra_topk_length, extra_indices.shape[2], x_raw, x_page, x_block, x_slot)
    key_element = 0 if is_fp8_kvcache else _ELEMENT[k_cache.dtype]
    _sparse(
        q.view(batch * s_q, h_q, d_qk), lists, extra, attn_sink, out.view(batch * s_q, h_q, 512), lse, (s_q, h_q * s_q, 1, s_q), None,
        tokens=batch * s_q, h_q=h_q, h_kv=h_kv, fp8=2 if model1 else int(is_fp8_kvcache), key_element=key_element,
        scale=softmax_scale, len_div=s_q,
    )
    return out, lse


def mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flash_mla_sparse_fwd`` (validated by ``hal.ops.mla_v2``)."""
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    out = torch.empty(s_q, h_q, d_v, dtype=torch.bfloat16)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32)
    lse = torch.empty(s_q, h_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, max_logits, lse
    kv = kv.contiguous()
    indices = indices.contiguous()
    item = kv.element_size()
    # A "page" of one token: position p at p * stride(0); KV head g at g * stride(1).
    lists = (indices, indices.stride(0), indices.stride(1), topk_length, indices.shape[2], s_kv, kv.view(torch.uint8), 1,
             kv.stride(0) * item, 0, kv.stride(1) * item)
    _sparse(
        q.contiguous(), lists, None, attn_sink, out, lse, (1, h_q, 0, 1), max_logits,
        tokens=s_q, h_q=h_q, h_kv=h_kv, fp8=0, key_element=_ELEMENT[kv.dtype], scale=sm_scale, len_div=1,
    )
    return out, max_logits, lse


def quantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """bf16/fp16/fp32 [blocks, page, 1, 576] -> float8_e4m3fn [blocks, page, 1, 656] (validated input)."""
    blocks, page = k_cache.shape[:2]
    out = torch.empty(blocks, page, 656, dtype=torch.uint8)
    if out.numel():
        rt = runtime()
        options = ["-cl-fp32-correctly-rounded-divide-sqrt"] if rt.correctly_rounded_divide else []
        program = build(rt, "quantize_mla_kv_cache", QUANTIZE_SOURCE, {"ELEMENT": _ELEMENT[k_cache.dtype]}, options)
        with bind(rt, "quantize_mla_kv_cache") as io:
            program.launch("quantize_mla_kv_cache", (blocks * page, 5), None, io.input(k_cache.reshape(blocks * page, 576)), io.output(out))
    return out.view(torch.float8_e4m3fn).view(blocks, page, 1, 656)


def _indexer_program(heads: int, dim: int, logits_dtype: torch.dtype, weights: torch.Tensor):
    rt = runtime()
    defines = {"H": heads, "D": dim, "OUT_BF16": int(logits_dtype == torch.bfloat16), "W_BF16": int(weights.dtype == torch.bfloat16)}
    return rt, build(rt, "indexer", INDEXER_SOURCE, defines)


def mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype) -> torch.Tensor:
    """``fp8_mqa_logits`` (validated by ``hal.ops.indexer``); unseen positions always -inf."""
    seq_len, heads, dim = q.shape
    width = max_seqlen_k or k.shape[0]
    out = torch.empty(seq_len, width, dtype=logits_dtype)
    if out.numel() == 0:
        return out
    rt, program = _indexer_program(heads, dim, logits_dtype, weights)
    local = min(LOGIT_KEYS, rt.max_work_group_size)
    with bind(rt, "mqa_logits") as io:
        program.launch(
            "mqa_logits", (-(-width // local) * local, seq_len), (local, 1),
            io.input(q.view(torch.uint8)), io.input(k.view(torch.uint8)), io.input(k_scales), io.input(weights.contiguous().view(torch.uint8)),
            io.input(k_start), io.input(k_end), io.output(out.view(torch.uint8)), np.int32(k.shape[0]), np.int32(width), np.int32(max_seqlen_k > 0),
        )
    return out


def paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype) -> torch.Tensor:
    """``fp8_paged_mqa_logits`` (validated by ``hal.ops.indexer``); unseen positions always -inf."""
    batch, next_n, heads, dim = q.shape
    out = torch.empty(batch * next_n, max_context_len, dtype=logits_dtype)
    if out.numel() == 0:
        return out
    rt, program = _indexer_program(heads, dim, logits_dtype, weights)
    local = min(LOGIT_KEYS, rt.max_work_group_size)
    cache = kv_cache.contiguous().view(torch.uint8)
    with bind(rt, "paged_mqa_logits") as io:
        program.launch(
            "paged_mqa_logits", (-(-max_context_len // local) * local, batch * next_n), (local, 1),
            io.input(q.view(torch.uint8)), io.input(cache), io.input(weights.contiguous().view(torch.uint8)), io.input(context_lens),
            io.input(block_table.contiguous()), io.output(out.view(torch.uint8)), np.int32(next_n), np.int32(max_context_len),
            np.int32(kv_cache.shape[1]), np.int32(block_table.shape[1]), np.int32(context_lens.dim() == 2),
        )
    return out
