"""Executable reference of the FP8 GEMMs, promoting per 128-wide K block as DeepGEMM's kernels do.

The Hopper kernel accumulates each 128-channel K block on tensor cores, then promotes that
partial sum to fp32 on CUDA cores with the block's two scales applied. The reference does the
same: an fp32 product per K block (fp8 products are exact in fp32), scaled by
``a_scales[m, kb] * b_scales[n // 128, kb]``, summed in fp32, cast to bf16 once at the end.
"""

from __future__ import annotations

import torch

from hal.ops.fp8_quant import BLOCK

__all__ = ["gemm_fp8_nt_reference", "m_grouped_contiguous_reference", "m_grouped_masked_reference", "blockwise_fp8_matmul"]


def blockwise_fp8_matmul(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N] = sum over K blocks of (a_blk @ b_blk.T) * a_scale * b_scale.

    Args:
        a: fp8 [M, K]; a_scales float32 [M, ceil(K / 128)].
        b: fp8 [N, K]; b_scales float32 [ceil(N / 128), ceil(K / 128)] (128x128 blocks) or
            [N, ceil(K / 128)] (per token, DeepGEMM's (1, 1, 128) recipe); the two agree at N = 1.
    """
    m, k = a.shape
    n = b.shape[0]
    per_token = b_scales.shape[0] == n
    b_row_scales = b_scales.float() if per_token else b_scales.float().repeat_interleave(BLOCK, dim=0)[:n]  # [N, ceil(K / 128)]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(-(-k // BLOCK)):  # the last block is partial when K is not a multiple of 128
        cols = slice(kb * BLOCK, min((kb + 1) * BLOCK, k))
        partial = a[:, cols].float() @ b[:, cols].float().T
        acc += partial * a_scales[:, kb].float().unsqueeze(1) * b_row_scales[:, kb].unsqueeze(0)
    return acc


def gemm_fp8_nt_reference(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: out [M, N] (bf16, or float32) = blockwise product, rounded once, written in place."""
    out.copy_(blockwise_fp8_matmul(a, a_scales, b, b_scales))


def m_grouped_contiguous_reference(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor
) -> None:
    """Contiguous grouped: row r uses group m_indices[r]; padding rows (-1) are left untouched."""
    groups = m_indices.long()
    for g in torch.unique(groups).tolist():
        if g < 0:
            continue
        rows = (groups == g).nonzero().squeeze(1)
        out[rows] = blockwise_fp8_matmul(a[rows], a_scales[rows], b[g], b_scales[g]).to(out.dtype)


def m_grouped_masked_reference(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
) -> None:
    """Masked grouped: the first masked_m[g] rows of group g; the other rows are left untouched."""
    for g, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            out[g, :rows] = blockwise_fp8_matmul(a[g, :rows], a_scales[g, :rows], b[g], b_scales[g]).to(out.dtype)
