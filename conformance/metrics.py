"""Error metrics and the pass thresholds of every operator, stated once.

The metrics are the anchors' own: FlashMLA's test and DeepGEMM's test both use
``1 - 2 * sum(x * y) / sum(x * x + y * y)`` computed in float64 (0 for identical tensors; FlashMLA
guards the denominator with 1e-12). A global metric averages: one wrong element in a million
hides in it. So every floating output also has a per-element bound (:class:`ElementBound`)
calibrated from its format's rounding, and both must pass. Non-finite values must match the
reference position by position (NaN where it has NaN, the same infinity where it has one); a NaN
anywhere else fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "ElementBound", "TOLERANCES", "tolerance", "cos_diff", "max_rel_error", "mismatches", "ulp"]


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2·Σxy / max(Σ(x² + y²), 1e-12)`` in float64 (FlashMLA's cal_diff, DeepGEMM's calc_diff),
    of x and y scaled together by a power of two that brings their largest magnitude to [1, 2).

    The metric is scale-free but the anchors' guard is not: outputs whose energy is below 1e-12
    (every value near 1e-7) would read as almost 1 however right they are. The common power of two
    changes no ratio (it is exact in float64), so the guard then only ever meets zeros."""
    x, y = x.double(), y.double()
    if x.numel():
        largest = float(torch.maximum(x.abs().max(), y.abs().max()))
        if 0.0 < largest < math.inf:
            shift = -math.floor(math.log2(largest))
            half = shift // 2  # two exact steps: 2^1074 (float64 subnormals) overflows as one factor
            x, y = x * 2.0**half * 2.0 ** (shift - half), y * 2.0**half * 2.0 ** (shift - half)
    energy = float((x * x + y * y).sum())
    if energy == 0.0:  # both empty or all zeros: identical (the anchors' guard would report 1)
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / max(energy, 1e-12)


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

ROUNDED_FORMATS = (torch.bfloat16, torch.float16)

# Mantissa bits of the formats outputs are rounded to: one unit in the last place of x is
# 2 ** (floor(log2 |x|) - bits).
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float8_e4m3fn: 3}


# The smallest normal exponent of each of those formats (by mantissa bits): below it the spacing
# stays that of the smallest normals (subnormals).
MIN_EXPONENT = {7: -126, 10: -14, 23: -126, 3: -6}


def ulp(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One unit in the last place of each |x| for a format with ``bits`` mantissa bits (float64),
    the subnormal spacing below the format's normals (bf16, fp16, fp32, e4m3 by their bits)."""
    magnitude = x.double().abs()
    exponent = torch.floor(torch.log2(magnitude.clamp(min=torch.finfo(torch.float64).tiny)))
    smallest = MIN_EXPONENT.get(bits)
    if smallest is not None:
        exponent = exponent.clamp(min=smallest)
    return torch.exp2(exponent - bits)


@dataclass(frozen=True)
class ElementBound:
    """How far one element may be from the reference:
    ``|got - ref| <= atol + atol_of_max * max|ref| + rtol * |ref| + ulps * ulp(ref)``, where ``ref``
    is the reference before its final rounding (fp32) when the family provides it; against a
    reference rounded to bf16/fp16 already, ``ulps`` grows by half a unit.

    The bound is calibrated from the numerics, so that one corrupted element, row or page fails
    even when the global metric cannot see it. ``ulps`` counts units in the last place of the
    output's own format (``bits`` mantissa bits): two correct implementations of the same fp32
    math that round at a different point land at most that many units apart.

    Attributes:
        atol, rtol, ulps, bits: the bound's terms.
        atol_of_max: absolute slack as a fraction of the output's largest magnitude: a sum that
            cancels to near zero carries the fp32 rounding of its large terms, not of its result.
        source: where the numbers come from.
    """

    atol: float
    rtol: float
    ulps: float
    bits: int
    source: str
    atol_of_max: float = 0.0

    def excess(self, got: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
        """The worst ``|got - ref| / bound`` over elements that are finite in both, and its flat index."""
        g, e = got.double().flatten(), expected.double().flatten()
        finite = torch.isfinite(g) & torch.isfinite(e)
        if not bool(finite.any()):
            return 0.0, -1
        scale = float(e[finite].abs().max())
        # Against a reference already rounded to the output format (a golden, a bf16 reference),
        # a correct result may sit one more half unit away: the two roundings can fall apart.
        ulps = self.ulps + 0.51 if expected.dtype in ROUNDED_FORMATS else self.ulps
        bound = self.atol + self.atol_of_max * scale + self.rtol * e.abs() + ulps * ulp(e, self.bits)
        ratio = torch.where(finite, (g - e).abs() / bound.clamp(min=1e-300), torch.zeros_like(g))
        worst = int(ratio.argmax())
        return float(ratio[worst]), worst


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
    element: ElementBound | None = None

    def passes(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value <= self.threshold if self.metric == "mismatches" else value < self.threshold

    def measure(self, got: torch.Tensor, expected: torch.Tensor) -> float:
        return METRICS[self.metric](got, expected)


_FLASH_MLA = "FlashMLA tests/test_flash_mla.py: cal_diff < 1e-5 for out and lse"
_FLASH_MLA_V32 = "FlashMLA HEAD tests/test_flash_mla_sparse_*.py: cos_diff < 1e-5 plus per-element abs/rel"
_DEEP_GEMM = "DeepGEMM tests/test_core.py: calc_diff < 0.001"
_DEEP_GEMM_BF16 = "DeepGEMM HEAD tests/test_bf16.py: calc_diff < 1e-5"
_INDEXER = "DeepGEMM HEAD tests/test_attention.py: calc_diff vs the FP8-simulated reference < 5e-6 (fp32 logits), 3e-5 (bf16)"
_RECORDS = "unihal: the FP8 cache writer is deterministic (FlashMLA tests/quant.py recipe, scale rounded up exactly): bytes compared exactly"
_QUANT = "unihal: deterministic cast; scales match to fp32 rounding, dequantised values to fp8 rounding"
_EXACT = "DeepEP tests: integer layouts compared exactly"
_MOVED = "unihal: pack/unpack copy rows bitwise; DeepEP's tests check received tokens exactly"
_REDUCED = "DeepEP tests/test_low_latency.py: calc_diff < 1e-5 for the bf16 weighted combine"

# Per-element bounds. FlashMLA's newest tests pair its global metric with these abs/rel checks.
_MLA_OUT = ElementBound(8e-4, 2.01 / 128, 0.0, 7, "FlashMLA HEAD tests: out abs 8e-4, rel 2.01/128")
# With the FP8 cache FlashMLA's HEAD tests allow out abs 1e-3; the dequantised keys are exact, so
# the rel term stays the bf16 one.
_MLA_V32_OUT = ElementBound(1e-3, 2.01 / 128, 0.0, 7, "FlashMLA HEAD sparse tests: out abs 1e-3 (FP8 cache), rel 2.01/128")
_MLA_LSE = ElementBound(1e-6, 8.01 / 65536, 0.0, 23, "FlashMLA HEAD tests: lse abs 1e-6, rel 8.01/65536")
# A bf16 GEMM output is fp32 math rounded once, to nearest, to bf16: a correct kernel that sums in
# another order lands within half a bf16 ulp of the reference's unrounded fp32 result, plus a few
# fp32 ulps of the largest partial sums where the sum cancels (1e-5 of the largest output covers K
# up to 16k). One element off by one bf16 unit fails; so does truncating instead of rounding.
_BF16_ROUNDED = ElementBound(0.0, 0.0, 0.5, 7, "unihal: half a bf16 ulp of the unrounded reference + fp32 accumulation slack", atol_of_max=1e-5)
# A float32 GEMM output is the fp32 sum itself: a correct kernel summing in another order lands a
# few fp32 ulps away, plus slack where the sum cancels (1e-5 of the largest output, as for bf16).
_FP32_GEMM = ElementBound(0.0, 0.0, 4.0, 23, "unihal: 4 fp32 ulps + fp32 accumulation slack (1e-5 of the largest output)", atol_of_max=1e-5)
# Indexer logits are an fp32 sum over heads of fp32 dot products of exact e4m3 products: a correct
# kernel lands within a few fp32 ulps of the float64 value, plus accumulation slack where the
# signed head weights cancel (2e-6 of the largest logit covers D=128, H=64 with a wide margin).
_FP32_SUM = ElementBound(0.0, 0.0, 4.0, 23, "unihal: 4 fp32 ulps of the float64 value + 2e-6 of the largest logit (an element within its terms' fp32 accumulation interval passes: metrics.within_accumulation)", atol_of_max=2e-6)
# Casts are deterministic: dequantised values may differ only by the fp8 rounding of a scale
# that itself differs by fp32 rounding.
_FP8_ROUNDED = ElementBound(0.0, 1e-6, 1.01, 3, "unihal: one e4m3 ulp of the dequantised value")

def within_accumulation(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, roundings: int, dtype: torch.dtype) -> torch.Tensor:
    """``got`` with the elements an fp32 evaluation in some order may give set to ``want``'s.

    An fp32 sum of products, in any order, lands within ``roundings * 2^-24 * magnitude`` of its
    float64 value ``want``, ``magnitude`` being the sum of the terms' absolute values (the
    products' too); rounded to ``dtype``, it lies between the roundings of the two ends of that
    interval. Random weights of both signs sometimes cancel an indexer logit to 1e-4 of its terms,
    far below the bound of "2e-6 of the largest logit" (:data:`_FP32_SUM`), which assumes no such
    cancellation, so that the reference itself would fail there: those elements are judged by this
    interval, every other by the bound as before. A wrong term (a head or a channel left out, a
    bf16 rounding inside) is orders of magnitude outside it."""
    slack = roundings * 2.0**-24 * magnitude
    low, high = (want - slack).to(dtype).double(), (want + slack).to(dtype).double()
    return torch.where((got >= low) & (got <= high), want, got)


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("mla_decode", "out"): Tolerance("cos_diff", 1e-5, _FLASH_MLA, _MLA_OUT),
    ("mla_decode", "lse"): Tolerance("cos_diff", 1e-5, _FLASH_MLA, _MLA_LSE),
    ("mla_decode_v2", "out"): Tolerance("cos_diff", 1e-5, _FLASH_MLA_V32, _MLA_V32_OUT),
    ("mla_decode_v2", "lse"): Tolerance("cos_diff", 1e-5, _FLASH_MLA_V32, _MLA_LSE),
    ("mla_sparse_prefill", "out"): Tolerance("cos_diff", 1e-5, _FLASH_MLA_V32, _MLA_V32_OUT),
    ("mla_sparse_prefill", "max_logits"): Tolerance("cos_diff", 1e-5, _FLASH_MLA_V32, _MLA_LSE),
    ("mla_sparse_prefill", "lse"): Tolerance("cos_diff", 1e-5, _FLASH_MLA_V32, _MLA_LSE),
    ("quantize_mla_kv_cache", "records"): Tolerance("mismatches", 0, _RECORDS),
    ("mqa_logits", "logits"): Tolerance("cos_diff", 5e-6, _INDEXER, _FP32_SUM),
    ("mqa_logits", "logits_bf16"): Tolerance("cos_diff", 3e-5, _INDEXER, _BF16_ROUNDED),
    ("paged_mqa_logits", "logits"): Tolerance("cos_diff", 5e-6, _INDEXER, _FP32_SUM),
    ("paged_mqa_logits", "logits_bf16"): Tolerance("cos_diff", 3e-5, _INDEXER, _BF16_ROUNDED),
    ("gemm_fp8_nt", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM, _BF16_ROUNDED),
    ("gemm_fp8_nt", "out_fp32"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM, _FP32_GEMM),
    ("gemm_bf16_nt", "out"): Tolerance("cos_diff", 1e-5, _DEEP_GEMM_BF16, _BF16_ROUNDED),
    ("gemm_bf16_nt", "out_fp32"): Tolerance("cos_diff", 1e-5, _DEEP_GEMM_BF16, _FP32_GEMM),
    ("m_grouped_gemm_bf16_nt_contiguous", "out"): Tolerance("cos_diff", 1e-5, _DEEP_GEMM_BF16, _BF16_ROUNDED),
    ("m_grouped_gemm_bf16_nt_masked", "out"): Tolerance("cos_diff", 1e-5, _DEEP_GEMM_BF16, _BF16_ROUNDED),
    ("m_grouped_gemm_fp8_nt_contiguous", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM, _BF16_ROUNDED),
    ("m_grouped_gemm_fp8_nt_masked", "out"): Tolerance("cos_diff", 1e-3, _DEEP_GEMM, _BF16_ROUNDED),
    ("per_token_cast_to_fp8", "scales"): Tolerance("max_rel_error", 1e-6, _QUANT),
    ("per_token_cast_to_fp8", "dequantized"): Tolerance("cos_diff", 1e-6, _QUANT, _FP8_ROUNDED),
    ("per_block_cast_to_fp8", "scales"): Tolerance("max_rel_error", 1e-6, _QUANT),
    ("per_block_cast_to_fp8", "dequantized"): Tolerance("cos_diff", 1e-6, _QUANT, _FP8_ROUNDED),
    ("ep_dispatch_layout", "num_tokens_per_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "num_tokens_per_rdma_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "num_tokens_per_expert"): Tolerance("mismatches", 0, _EXACT),
    ("ep_dispatch_layout", "is_token_in_rank"): Tolerance("mismatches", 0, _EXACT),
    ("ep_pack", "packed"): Tolerance("mismatches", 0, _MOVED),
    ("ep_pack", "src_idx"): Tolerance("mismatches", 0, _MOVED),
    ("ep_pack", "num_rows_per_bucket"): Tolerance("mismatches", 0, _EXACT),
    ("ep_unpack", "slots"): Tolerance("mismatches", 0, _MOVED),
    ("ep_unpack", "num_rows_per_bucket"): Tolerance("mismatches", 0, _EXACT),
    ("ep_combine_reduce", "out"): Tolerance("cos_diff", 1e-5, _REDUCED, _BF16_ROUNDED),
}


def tolerance(op: str, output: str) -> Tolerance:
    return TOLERANCES[(op, output)]
