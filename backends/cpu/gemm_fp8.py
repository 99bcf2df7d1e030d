"""FP8 GEMMs with fine-grained scales (DeepGEMM semantics) as torch CPU calls.

Numerics are the reference's (:mod:`hal.ops.gemm_reference`), step for step:

1. fp8 e4m3fn operands are decoded exactly to float32 (every e4m3 value, NaN included, is a float32);
2. each 128-wide K block is one fp32 matrix product (products of two e4m3 values are exact in
   fp32; the 128-term sum is accumulated in fp32), computed for all K blocks of a chunk by one ``torch.bmm``
   into ``partial`` float32 [K/128, rows, cols];
3. each block's partial sum is promoted as ``partial * a_scales[m, kb] * b_scales[n, kb]`` in fp32
   (in that order, as the reference) and the blocks are summed in fp32;
4. ``out`` (bfloat16 or float32) is written once, rounding to nearest even.

Why these torch calls. torch's own fp8 casts run element by element (~25 ms for a 7168 x 2048
weight here), so operands are decoded through a 256-entry table (``index_select``), 2-6x faster. No
torch CPU call multiplies bf16 operands into a float32 result (``mm(..., out_dtype=)`` is not
implemented for CPU in torch 2.13; a bf16 ``mm`` rounds its result to bf16, which would lose the
per-block partial sums), so the products run in float32 on the decoded values (MKL sgemm), which
keeps the contract exact. Work is cut into chunks of N (and M) so that the decoded weights and the
partial sums stay in cache and memory stays bounded whatever the shapes.

Layouts (as the ops layer hands them over): a float8_e4m3fn [M, K] (grouped: [G, M_max, K])
contiguous, K a multiple of 128; a_scales float32 [M, K/128], any strides; b float8_e4m3fn
[N, K] (grouped: [G, N, K]) contiguous; b_scales float32 [ceil(N/128), K/128] (128x128 blocks)
or [N, K/128] (per-token, contract v2 ``b_per_token``); out bfloat16 or float32 (v2 ``fp32_out``),
contiguous, written in place.
"""

from __future__ import annotations

import torch

from hal.ops.fp8_quant import BLOCK

__all__ = ["decode_e4m3", "gemm_fp8_nt", "m_grouped_contiguous", "m_grouped_masked"]

# Scratch bounds of one chunk: the decoded weight rows [cols, K] and the partial sums
# [K/128, rows, cols] stay in cache between the decode, the products and the reduction, and memory
# stays bounded whatever the shapes. Measured on a 2-core AVX-512 host: the per-block products of a
# 256 x 1024 chunk run at ~90% of a full-K fp32 GEMM of the same size; larger budgets gain nothing.
WEIGHT_BYTES = 8 << 20
PARTIAL_BYTES = 16 << 20
# Rows of A per chunk: a full-speed GEMM height that still leaves room for wide column chunks.
M_CHUNK = 256

# The 256 e4m3fn values as float32, indexed by their bit pattern (0x7f and 0xff are NaN).
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def decode_e4m3(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float8_e4m3fn [..., K] -> float32 of the same shape, exactly (NaN codes stay NaN).

    ``x`` may be any strided view; ``out``, when given, is a contiguous float32 tensor of
    ``x``'s shape that receives the values (a reusable buffer)."""
    # uint8 -> int32 indices (index_select takes no uint8), then one table gather.
    codes = x.view(torch.uint8).to(torch.int32)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.index_select(_E4M3_VALUES, 0, codes.reshape(-1), out=out.view(-1))
    return out


def _column_scales(b_scales: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [K/128, N]: the scale of RHS column n in each K block.

    ``b_scales`` is [ceil(N/128), K/128] (one per 128x128 block) or [N, K/128] (per token; the
    two agree at N = 1), as the reference reads them."""
    per_token = b_scales.shape[0] == n
    rows = b_scales if per_token else b_scales.repeat_interleave(BLOCK, dim=0)[:n]
    return rows.float().t()


def _chunk_columns(k_blocks: int, rows: int, k: int) -> int:
    """Columns of N per chunk: a multiple of 128 (whole scale blocks) with the decoded weight rows
    [cols, K] within WEIGHT_BYTES and the partial sums [K/128, rows, cols] within PARTIAL_BYTES
    (at least 128)."""
    by_partials = PARTIAL_BYTES // (4 * k_blocks * max(rows, 1))
    by_weights = WEIGHT_BYTES // (4 * k)
    return max(BLOCK, min(by_partials, by_weights) // BLOCK * BLOCK)


def _blockwise(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` [M, N] = sum over K blocks of (a_blk @ b_blk.T) * a_scales * b_scales, in fp32.

    Args:
        a: float8_e4m3fn [M, K], rows contiguous along K, K % 128 == 0.
        a_scales: float32 [M, K/128], any strides.
        b: float8_e4m3fn [N, K], contiguous.
        b_scales: float32 [ceil(N/128), K/128] or [N, K/128].
        out: bfloat16 or float32 [M, N] (a view with unit stride along N), overwritten.
    """
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    k_blocks = k // BLOCK
    if k_blocks == 0:  # no products: every sum is zero
        out.zero_()
        return
    a32 = decode_e4m3(a)
    # Contiguous [K/128, rows] and [K/128, cols] scales: broadcasting a transposed view makes the
    # scaling kernels fall off their vectorised path.
    row_scales = a_scales.float().t().contiguous()
    col_scales = _column_scales(b_scales, n).contiguous()
    m_step = min(m, M_CHUNK)
    n_step = min(n, _chunk_columns(k_blocks, m_step, k))
    weights = torch.empty(n_step, k, dtype=torch.float32, device=a.device)
    partial = torch.empty(k_blocks, m_step, n_step, dtype=torch.float32, device=a.device)
    total = torch.empty(m_step, n_step, dtype=torch.float32, device=a.device)
    for n0 in range(0, n, n_step):
        n1 = min(n, n0 + n_step)
        cols = n1 - n0
        b32 = decode_e4m3(b[n0:n1], weights[:cols])
        b_blocks = b32.view(cols, k_blocks, BLOCK).permute(1, 2, 0)  # [K/128, 128, cols], B^T per block
        for m0 in range(0, m, m_step):
            m1 = min(m, m0 + m_step)
            rows = m1 - m0
            a_blocks = a32[m0:m1].view(rows, k_blocks, BLOCK).transpose(0, 1)  # [K/128, rows, 128]
            p = partial[:, :rows, :cols]
            torch.bmm(a_blocks, b_blocks, out=p)
            # The reference's promotion order: (partial * a_scale) * b_scale, then the block sum.
            p.mul_(row_scales[:, m0:m1, None])
            p.mul_(col_scales[:, None, n0:n1])
            acc = total[:rows, :cols]
            torch.sum(p, dim=0, out=acc)
            out[m0:m1, n0:n1].copy_(acc)


def gemm_fp8_nt(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: ``out`` [M, N] (bfloat16 or float32) = (a * a_scales) @ (b * b_scales).T, written in place."""
    _blockwise(a, a_scales, b, b_scales, out)


def _group_runs(m_indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` for each run of consecutive rows of one group; -1 padding skipped.

    DeepGEMM's contiguous layout makes each group one run, but a group split over several runs
    is still computed correctly (its weights are decoded once per run)."""
    groups, counts = torch.unique_consecutive(m_indices, return_counts=True)
    runs, start = [], 0
    for group, count in zip(groups.tolist(), counts.tolist()):
        if group >= 0:
            runs.append((group, start, start + count))
        start += count
    return runs


def m_grouped_contiguous(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor
) -> None:
    """MoE contiguous: a [M, K], b [G, N, K], out [M, N]; rows of group g use b[g]; -1 rows untouched."""
    for group, start, end in _group_runs(m_indices):
        _blockwise(a[start:end], a_scales[start:end], b[group], b_scales[group], out[start:end])


def m_grouped_masked(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out: torch.Tensor,
    masked_m: torch.Tensor,
) -> None:
    """MoE masked: a [G, M_max, K], b [G, N, K], out [G, M_max, N]; the first masked_m[g] rows of
    each group are computed, the others left untouched (empty groups cost nothing)."""
    for group, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            _blockwise(a[group, :rows], a_scales[group, :rows], b[group], b_scales[group], out[group, :rows])
