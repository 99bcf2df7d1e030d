"""MLA decode over the paged KV cache (FlashMLA semantics) as OpenCL kernels, split over the keys.

``mla_decode_split``: a work-group takes one chunk of one sequence's keys (whole pages) for
ROWS query rows of one KV head (rows ordered (s_q, head) as FlashMLA's tiles are). It keeps the
rows of q in local memory, pre-scaled by ``softmax_scale * log2(e)``, and walks the chunk KEYS
keys at a time: decode the keys into local memory (keys outside the chunk are zeros, never the
cache's contents, so unused slots cannot leak NaN), scores in RB x JB register blocks, an online
softmax per row (max, rescale, sum), then ``O = alpha * O + P @ V`` with each work-item owning
16-column slices of the 512 value channels. A chunk that is its sequence's only one writes
``out`` and ``lse`` itself; otherwise it writes a normalised partial (out, lse) and
``mla_decode_combine`` merges a sequence's partials with log-sum-exp weights.

Causal (s_q > 1): query i sees keys ``0 .. seqlen - s_q + i``. A query that sees no key gets
out = 0 and lse = +inf; NaN and inf inputs propagate as the reference states (a NaN-propagating
running max, emptiness decided by visibility, never by the softmax sum).

The split plan is this backend's own (whole pages, sized to the device's compute units): the
schedule arguments of the contract do not change the result and are not needed here.

Layouts (made contiguous): q [batch, s_q, h_q, 576]; k_cache [num_blocks, 64, h_kv, 576];
block_table int32 [batch, max_pages]; cache_seqlens int32 [batch]. Returns out [batch, s_q,
h_q, 512] (dtype of q) and lse float32 [batch, h_q, s_q].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hal.backends.opencl.buffers import bind
from hal.backends.opencl.device import Runtime, runtime
from hal.backends.opencl.errors import OpenCLError
from hal.backends.opencl.numeric import NUMERIC_SOURCE
from hal.backends.opencl.program import build
from hal.ops.mla import HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE

__all__ = ["mla_decode", "Plan", "plan_chunks", "chunk_pages", "Tiles", "choose_tiles"]

_ELEMENT = {torch.bfloat16: 0, torch.float16: 1}

MLA_DECODE_SOURCE = NUMERIC_SOURCE + r"""
/* ROWS query rows per work-group, KEYS keys per step (a multiple of 16 dividing the 64-key page),
   WG work-items (dividing 32), ELEMENT 0 bf16 / 1 fp16. Scores are computed in RB x JB register
   blocks. Hot loops use operators and aligned vector dereferences, not builtins (see numeric). */
#define D 576
#define DV 512
#define PAGE 64
#define D16 (D / 16)
#define DV16 (DV / 16)
#define KEYS16 (KEYS / 16)
#define SLICES (DV16 / WG)
#define RB 4
#define JB 4

#if ELEMENT == 1
#define DECODE16(p) fp16x16_to_float(*(__global const ushort16*)(p))
#define ENCODE(x) float_to_fp16(x)
#else
#define DECODE16(p) bf16x16_to_float(*(__global const ushort16*)(p))
#define ENCODE(x) float_to_bf16(x)
#endif

inline float hsum16(float16 v) {
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}

/* 16 channels of out in q's dtype (rows of out are 1 KiB: the address is 32-byte aligned) */
inline void store_out(__global ushort* dst, float16 o) {
    ushort lanes[16];
    const float* v = (const float*)&o;
    for (int e = 0; e < 16; ++e) lanes[e] = ENCODE(v[e]);
    *(__global ushort16*)dst = *(ushort16*)lanes;
}

/* Grid: (WG * chunks, row blocks, h_kv). chunks: int4 (batch, key_begin, key_end, slot). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void mla_decode_split(
    __global const ushort* q, __global const ushort* k_cache, __global const int* block_table, __global const int* seqlens,
    __global const int* chunks, __global float16* part_out, __global float* part_lse, __global ushort* out, __global float* lse,
    int s_q, int h_q, int h_kv, int max_pages, float scale_log2, int causal)
{
    __local float16 Qs[ROWS * D16];
    __local float16 Ks[KEYS * D16];
    __local float16 P[ROWS * KEYS16];
    __local float row_max[ROWS], row_sum[ROWS], row_alpha[ROWS];
    __local int row_visible[ROWS];
    __local const float* p_scalar = (__local const float*)P;

    const int lid = get_local_id(0);
    const int head_kv = get_group_id(2), group = h_q / h_kv, rows_per_head = s_q * group;
    const int row0 = get_group_id(1) * ROWS;
    __global const int* chunk = chunks + 4 * get_group_id(0);
    const int b = chunk[0], key_begin = chunk[1], key_end = chunk[2], slot = chunk[3];
    const int seqlen = seqlens[b];

    for (int idx = lid; idx < ROWS * D16; idx += WG) {
        const int r = idx / D16, c = idx % D16, row = row0 + r;
        float16 v = 0.0f;
        if (row < rows_per_head) {
            const int i = row / group, h = head_kv * group + row % group;
            v = DECODE16(q + (((long)b * s_q + i) * h_q + h) * D + c * 16) * scale_log2;
        }
        Qs[idx] = v;
    }
    for (int r = lid; r < ROWS; r += WG) {
        const int row = row0 + r;
        row_max[r] = -INFINITY;
        row_sum[r] = 0.0f;
        row_visible[r] = row >= rows_per_head ? 0 : causal ? clamp(seqlen - s_q + 1 + row / group, 0, seqlen) : seqlen;
    }
    float16 acc[SLICES][ROWS];   /* O of this work-item's value slices lid, lid + WG, ...; in memory on CPUs */
    for (int u = 0; u < SLICES; ++u)
        for (int r = 0; r < ROWS; ++r) acc[u][r] = 0.0f;

    for (int t0 = key_begin; t0 < key_end; t0 += KEYS) {
        barrier(CLK_LOCAL_MEM_FENCE);   /* Q and the row state are in place; the previous step is consumed */
        const int page = block_table[(long)b * max_pages + t0 / PAGE];
        __global const ushort* keys = k_cache + (((long)page * PAGE + t0 % PAGE) * h_kv + head_kv) * D;
        for (int idx = lid; idx < KEYS * D16; idx += WG) {
            const int j = idx / D16, c = idx % D16;
            /* keys past the chunk are zeros, never read: unused cache slots may hold anything */
            Ks[idx] = t0 + j < key_end ? DECODE16(keys + (long)j * h_kv * D + c * 16) : (float16)0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int blk = lid; blk < (ROWS / RB) * (KEYS / JB); blk += WG) {
            const int r0 = blk / (KEYS / JB) * RB, j0 = blk % (KEYS / JB) * JB;
            float16 s[RB][JB];
            #pragma unroll
            for (int i = 0; i < RB; ++i)
                #pragma unroll
                for (int j = 0; j < JB; ++j) s[i][j] = 0.0f;
            for (int c = 0; c < D16; ++c) {
                float16 kv[JB];
                #pragma unroll
                for (int j = 0; j < JB; ++j) kv[j] = Ks[(j0 + j) * D16 + c];
                #pragma unroll
                for (int i = 0; i < RB; ++i) {
                    const float16 qv = Qs[(r0 + i) * D16 + c];
                    #pragma unroll
                    for (int j = 0; j < JB; ++j) s[i][j] += qv * kv[j];
                }
            }
            __local float* scores = (__local float*)P;
            for (int i = 0; i < RB; ++i)
                for (int j = 0; j < JB; ++j) {
                    const int t = t0 + j0 + j;
                    scores[(r0 + i) * KEYS + j0 + j] = t < key_end && t < row_visible[r0 + i] ? hsum16(s[i][j]) : -INFINITY;
                }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        /* online softmax (log2 units): P <- exp2(score - running max); rescale factor of the old rows */
        for (int r = lid; r < ROWS; r += WG) {
            const float old_max = row_max[r];
            float m = old_max;
            /* NaN-propagating max: a NaN score must poison the row, never be skipped as fmax would */
            for (int j = 0; j < KEYS; ++j) {
                const float x = p_scalar[r * KEYS + j];
                m = (x > m || isnan(x)) ? x : m;
            }
            float alpha = 1.0f, sum = 0.0f;
            for (int v = 0; v < KEYS16; ++v) {
                /* no key visible yet (m = -inf): P = 0, and O and the sum stay 0 */
                const float16 p = m == -INFINITY ? (float16)0.0f : exp2(P[r * KEYS16 + v] - m);
                P[r * KEYS16 + v] = p;
                sum += hsum16(p);
            }
            if (m != -INFINITY) alpha = exp2(old_max - m);
            row_max[r] = m;
            row_sum[r] = row_sum[r] * alpha + sum;
            row_alpha[r] = alpha;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        /* The slice loop's bounds depend on the work-item on purpose: compilers that interchange
           uniform loops with the work-item loop (PoCL) would otherwise spill o[] on every key. */
        for (int u = 0, c = lid; c < DV16; ++u, c += WG) {
            float16 o[ROWS];   /* registers for the key loop; acc is written back once */
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) o[r] = acc[u][r] * row_alpha[r];
            for (int j = 0; j < KEYS; ++j) {
                const float16 v = Ks[j * D16 + c];
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) o[r] += p_scalar[r * KEYS + j] * v;
            }
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[u][r] = o[r];
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);   /* the row state of the last step (or of the start: an empty chunk) */

    for (int r = 0; r < ROWS && row0 + r < rows_per_head; ++r) {
        const int row = row0 + r, i = row / group, h = head_kv * group + row % group;
        const float l = row_sum[r];
        /* Whether this row sees a key of the chunk decides emptiness, never l: NaN and inf inputs
           make l NaN or 0 and must reach the outputs (0 / 0 = NaN), not look like an empty row. */
        const int sees = key_begin < row_visible[r];
        for (int u = 0; u < SLICES; ++u) {
            const int c = lid + u * WG;
            /* a chunk the row does not see keeps its raw sum (0, or NaN from 0 * a NaN key) at weight 0 */
            const float16 o = slot < 0 && !sees ? (float16)0.0f : sees ? acc[u][r] / l : acc[u][r];
            if (slot < 0) store_out(out + (((long)b * s_q + i) * h_q + h) * DV + c * 16, o);
            else part_out[(((long)slot * h_kv + head_kv) * rows_per_head + row) * DV16 + c] = o;
        }
        if (lid != 0) continue;
        const float value = sees ? (row_max[r] + log2(l)) * M_LN2_F : -INFINITY;   /* natural log */
        if (slot < 0) lse[((long)b * h_q + h) * s_q + i] = sees ? value : INFINITY;
        else part_lse[((long)slot * h_kv + head_kv) * rows_per_head + row] = value;
    }
}

/* Grid: (DV / 16, rows per KV head, split sequences * h_kv): one 16-column slice of one row.
   combines: int3 (batch, first slot, slots). Partials are normalised; weights exp(lse - max). */
__kernel void mla_decode_combine(__global const float16* part_out, __global const float* part_lse, __global const int* combines,
                                 __global const int* seqlens, __global ushort* out, __global float* lse, int s_q, int h_q, int h_kv, int causal)
{
    const int c = get_global_id(0), row = get_global_id(1);
    const int head_kv = get_global_id(2) % h_kv, group = h_q / h_kv, rows_per_head = s_q * group;
    __global const int* entry = combines + 3 * (get_global_id(2) / h_kv);
    const int b = entry[0], first = entry[1], count = entry[2];
    const int i = row / group, h = head_kv * group + row % group;
    const int seqlen = seqlens[b];
    const int visible = causal ? clamp(seqlen - s_q + 1 + i, 0, seqlen) : seqlen;
    float m = -INFINITY;
    for (int s = 0; s < count; ++s) {   /* NaN-propagating max */
        const float x = part_lse[((long)(first + s) * h_kv + head_kv) * rows_per_head + row];
        m = (x > m || isnan(x)) ? x : m;
    }
    const float m_safe = m == -INFINITY ? 0.0f : m;   /* all partials -inf: weights 0, total 0, out 0 / 0 */
    float16 o = 0.0f;
    float total = 0.0f;
    for (int s = 0; s < count; ++s) {
        const long at = ((long)(first + s) * h_kv + head_kv) * rows_per_head + row;
        const float w = exp(part_lse[at] - m_safe);
        total += w;
        o += w * part_out[at * DV16 + c];
    }
    o = visible > 0 ? o / total : (float16)0.0f;
    store_out(out + (((long)b * s_q + i) * h_q + h) * DV + c * 16, o);
    if (c == 0) lse[((long)b * h_q + h) * s_q + i] = visible > 0 ? m + log(total) : INFINITY;
}
"""


@dataclass(frozen=True)
class Tiles:
    """ROWS query rows per work-group, KEYS keys per step (16, 32 or 64), WG work-items (divides 32)."""

    rows: int
    keys: int
    wg: int

    def local_bytes(self) -> int:
        return 4 * (self.rows * HEAD_DIM_QK + self.keys * HEAD_DIM_QK + self.rows * self.keys + 4 * self.rows)


def choose_tiles(rt: Runtime) -> Tiles:
    """The largest tiles the device's local memory holds; on CPUs few work-items (one core runs a group)."""
    wg = 8 if rt.is_cpu else 32
    for rows, keys in ((16, 32), (16, 16), (8, 16), (4, 16)):
        tiles = Tiles(rows, keys, min(wg, _power_of_two_at_most(rt.max_work_group_size)))
        if tiles.local_bytes() <= rt.local_mem_size:
            return tiles
    raise OpenCLError(f"{rt.name}: {rt.local_mem_size} bytes of local memory cannot hold an MLA tile (4 rows x 16 keys); use another device")


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class Plan:
    """Chunks of keys: int32 rows (batch, key_begin, key_end, slot), slot -1 when the chunk is its
    sequence's only one; combine rows (batch, first_slot, num_slots) for split sequences."""

    chunks: torch.Tensor
    combines: torch.Tensor
    num_slots: int


def chunk_pages(rt: Runtime, seqlens: list[int], groups_per_chunk: int) -> int:
    """Pages per chunk so that about two work-groups per compute unit run.

    Args:
        rt: the device.
        seqlens: keys per sequence.
        groups_per_chunk: work-groups each chunk occupies (row blocks x KV heads).

    A CPU pays tens of microseconds for the combine launch that a split costs, so it splits only
    sequences longer than 8 pages; a GPU splits down to single pages.
    """
    pages = sum(-(-s // PAGE_BLOCK_SIZE) for s in seqlens)
    wanted = 2 * rt.compute_units
    return max(8 if rt.is_cpu else 1, -(-pages * groups_per_chunk // wanted))


def plan_chunks(seqlens: list[int], pages_per_chunk: int) -> Plan:
    """Cut each sequence into chunks of ``pages_per_chunk`` whole pages (the last one shorter)."""
    chunks: list[list[int]] = []
    combines: list[list[int]] = []
    slots = 0
    span = pages_per_chunk * PAGE_BLOCK_SIZE
    for b, seqlen in enumerate(seqlens):
        count = max(1, -(-seqlen // span))
        if count == 1:
            chunks.append([b, 0, seqlen, -1])  # also an empty sequence: it writes out = 0, lse = +inf
            continue
        combines.append([b, slots, count])
        for c in range(count):
            chunks.append([b, c * span, min(seqlen, (c + 1) * span), slots])
            slots += 1
    return Plan(
        torch.tensor(chunks, dtype=torch.int32).reshape(-1, 4), torch.tensor(combines, dtype=torch.int32).reshape(-1, 3), slots
    )


def mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    pages_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; ``pages_per_chunk`` overrides the split plan's chunk length."""
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    rows_per_head = s_q * (h_q // h_kv)
    out = torch.empty(batch, s_q, h_q, HEAD_DIM_V, dtype=q.dtype)
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    rt = runtime()
    tiles = choose_tiles(rt)
    row_blocks = -(-rows_per_head // tiles.rows)
    seqlens = [int(s) for s in cache_seqlens.tolist()]
    plan = plan_chunks(seqlens, pages_per_chunk or chunk_pages(rt, seqlens, row_blocks * h_kv))
    program = build(
        rt, "mla_decode", MLA_DECODE_SOURCE,
        {"ROWS": tiles.rows, "KEYS": tiles.keys, "WG": tiles.wg, "ELEMENT": _ELEMENT[q.dtype]},
    )
    scalars = (np.int32(s_q), np.int32(h_q), np.int32(h_kv), np.int32(block_table.shape[1]))
    with bind(rt, "mla_decode") as io:
        part_out = io.scratch(plan.num_slots * h_kv * rows_per_head * HEAD_DIM_V * 4)
        part_lse = io.scratch(plan.num_slots * h_kv * rows_per_head * 4)
        out_buf, lse_buf, seqlens_buf = io.output(out), io.output(lse), io.input(cache_seqlens)
        program.launch(
            "mla_decode_split", (tiles.wg * plan.chunks.shape[0], row_blocks, h_kv), (tiles.wg, 1, 1),
            io.input(q), io.input(k_cache), io.input(block_table), seqlens_buf, io.input(plan.chunks),
            part_out, part_lse, out_buf, lse_buf, *scalars, np.float32(softmax_scale * math.log2(math.e)), np.int32(causal),
        )
        if plan.combines.shape[0]:
            local = min(HEAD_DIM_V // 16, _power_of_two_at_most(rt.max_work_group_size))
            program.launch(
                "mla_decode_combine", (HEAD_DIM_V // 16, rows_per_head, plan.combines.shape[0] * h_kv), (local, 1, 1),
                part_out, part_lse, io.input(plan.combines), seqlens_buf, out_buf, lse_buf, *scalars[:3], np.int32(causal),
            )
    return out, lse
