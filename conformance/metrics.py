"""Error metrics and the pass thresholds of every operator, stated once.

The metrics are the anchors' own: FlashMLA's test and DeepGEMM's test both use
``1 - 2 * sum(x * y) / sum(x * x + y * y)`` computed in float64 (0 for identical tensors; FlashMLA
guards the denominator with 1e-12). A NaN never passes: any NaN in a compared output fails the
check whatever the metric says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "cos_diff", "max_rel_error", "mismatches"]


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2·Σxy / max(Σ(x² + y²), 1e-12)`` in float64 (FlashMLA's cal_diff, DeepGEMM's calc_diff)."""
    x, y = x.double(), y.double()
    denominator = max(float((x * x + y * y).sum()), 1e-12)
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


def max_rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| / max(|y|, tiny) in float64."""
    x, y = x.double(), y.double()
    if x.numel() == 0:
        return 0.0
    return float(((x - y).abs() / y.abs().clamp(min=1e-30)).max())


def mismatches(x: torch.Tensor, y: torch.Tensor) -> float:
    """Number of differing elements (exact comparison; shapes must match)."""
    if x.shape != y.shape:
        return math.inf
    return float((x != y).sum())


METRICS = {"cos_diff": cos_diff, "max_rel_error": max_rel_error, "mismatches": mismatches}


@dataclass(frozen=True)
class Tolerance:
    """How one output of one operator is judged.

    Attributes:
        metric: a name in :data:`METRICS`.
        threshold: the check passes when ``value < threshold`` (``<=`` for exact metrics).
        source: where the anchor states it.
    """

    metric: str
    threshold: float
    source: str

    def passes(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value <= self.threshold if self.metric == "mismatches" else value < self.threshold

    def measure(self, got: torch.Tensor, expected: torch.Tensor) -> float:
        return METRICS[self.metric](got, expected)


_FLASH_MLA = "FlashMLA tests/test_flash_mla.py: cal_diff < 1e-5 for out and lse"
_DEEP_GEMM = "DeepGEMM tests/test_core.py: calc_diff < 0.001"
_QUANT = "unihal: deterministic cast; scales match to fp32 rounding, dequantised values to fp8 rounding"
_EXACT = "DeepEP tests: integer layouts compared exactly"
_MOVED = "unihal: pack/unpack copy rows bitwise; DeepEP's tests check received tokens exactly"
_REDUCED = "DeepEP tests/test_low_latency.py: calc_diff < 1e-5 for the bf16 weighted combine"

TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("mla_decode", "out"): Tolerance("cos_diff", 1e-5, _FLASH_MLA),
    ("mla_decode", "lse"): Tolerance("cos_diff", 1e-5, _FLASH_MLA),
    ("gemm_fp8_nt", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM),
    ("m_grouped_gemm_fp8_nt_contiguous", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM),
    ("m_grouped_gemm_fp8_nt_masked", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM),
    ("per_token_cast_to_fp8", "scales"): Tolerance("max_rel_error", 1e-6, _QUANT),
    ("per_token_cast_to_fp8", "dequantized"): Tolerance("cos_diff", 1e-6, _QUANT),
    ("per_block_cast_to_fp8", "scales"): Tolerance("max_rel_error", 1e-6, _QUANT),
    ("per_block_cast_to_fp8", "dequantized"): Tolerance("cos_diff", 1e-6, _QUANT),
    ("ep_dispatch_layout", "num_tokens_per_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "num_tokens_per_rdma_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "num_tokens_per_expert"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "is_token_in_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_pack", "packed"): Tolerance("mismatches", 0, _MOVED),
    ("ep_pack", "src_idx"): Tolerance("mismatches", 0, _MOVED),
    ("ep_pack", "num_rows_per_bucket"): Tolerance("mismatches", 0, _EXACT),
    ("ep_unpack", "slots"): Tolerance("mismatches", 0, _MOVED),
    ("ep_unpack", "num_rows_per_bucket"): Tolerance("mismatches", 0, _EXACT),
    ("ep_combine_reduce", "out"): Tolerance("cos_diff", 1e-5, _REDUCED),
}


def tolerance(op: str, output: str) -> Tolerance:
    return TOLERANCES[(op, output)]
