"""DeepGEMM's public API on hal: the FP8 GEMMs (v1 names), their layout helpers, and the
DeepSeek-V3.2 indexer (``fp8_mqa_logits``, ``fp8_paged_mqa_logits``, ``get_paged_mqa_logits_metadata``
and their ``fp8_fp4_*`` forms with FP8 inputs; see :mod:`hal.ops.indexer`).

Same names, signatures and in-place semantics as ``deep_gemm``; see :mod:`hal.ops.gemm`.
hal's GEMMs accept LHS scales in any layout, so ``get_col_major_tma_aligned_tensor`` is only
needed by code that wants DeepGEMM's exact layout; it produces it.
"""

from __future__ import annotations

import torch

from hal.ops.gemm import (
    gemm_fp8_fp8_bf16_nt,
    get_m_alignment_for_contiguous_layout,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
)
from hal.ops.indexer import (
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
)
from hal.ops.mla_schedule import default_num_sms

__all__ = [
    "gemm_fp8_fp8_bf16_nt",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "get_m_alignment_for_contiguous_layout",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "get_paged_mqa_logits_metadata",
    "get_col_major_tma_aligned_tensor",
    "get_tma_aligned_size",
    "set_num_sms",
    "get_num_sms",
    "ceil_div",
]

_num_sms: int | None = None


def ceil_div(x: int, y: int) -> int:
    """Ceiling of x / y for non-negative integers."""
    return (x + y - 1) // y


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x * element_size is a multiple of 16 bytes (TMA's alignment)."""
    alignment = 16 // element_size
    return ceil_div(x, alignment) * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` ([M, K] or [G, M, K]) in a column-major layout whose M stride is TMA-aligned.

    Returns ``x`` itself when it already has that layout, as DeepGEMM does.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"get_col_major_tma_aligned_tensor: expected a 2-d or 3-d tensor, got {x.dim()}-d")
    batched = x if x.dim() == 3 else x.unsqueeze(0)
    groups, m, k = batched.shape
    aligned_m = get_tma_aligned_size(m, x.element_size())
    if batched.stride(1) == 1 and batched.stride(2) == aligned_m:
        return x
    storage = torch.empty(groups, k, aligned_m, dtype=x.dtype, device=x.device)
    storage[:, :, :m] = batched.transpose(1, 2)
    aligned = storage[:, :, :m].transpose(1, 2)
    return aligned if x.dim() == 3 else aligned.squeeze(0)


def set_num_sms(num_sms: int) -> None:
    """Record the SM budget DeepGEMM code sets. hal's kernels size their grids from the problem,
    not from a persistent SM count, so the value is reported by :func:`get_num_sms` only."""
    global _num_sms
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"set_num_sms: expected a positive int, got {num_sms!r}")
    _num_sms = num_sms


def get_num_sms() -> int:
    """The value given to :func:`set_num_sms`, else the current GPU's SM count (132 without a GPU)."""
    if _num_sms is not None:
        return _num_sms
    return default_num_sms(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
