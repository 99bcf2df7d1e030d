"""DeepGEMM's public API on hal, both generations side by side (one implementation, two spellings).

- current names (DeepGEMM 2.x): ``fp8_gemm_{nt,nn,tn,tt}``, ``m_grouped_fp8_gemm_{nt,nn}_contiguous``,
  ``m_grouped_fp8_gemm_nt_masked`` (and its alias ``fp8_m_grouped_gemm_nt_masked``),
  ``k_grouped_fp8_gemm_{nt,tn}_contiguous``, the BF16 GEMMs, the ``fp8_fp4_*`` spellings (FP8
  operands; FP4 is SM100's and raises a typed error), the indexer, the layout helpers and the
  casts of ``deep_gemm.utils`` (UE8M0 scales included);
- v1 names: ``gemm_fp8_fp8_bf16_nt``, ``m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,masked}``,
  ``wgrad_gemm_fp8_fp8_fp32_nt``, ``k_grouped_wgrad_gemm_fp8_fp8_fp32_nt``.

As in DeepGEMM, the helpers are also importable from ``deep_gemm.utils`` (``.math``, ``.layout``)
and the test helpers from ``deep_gemm.testing`` (:mod:`hal.compat.deep_gemm.testing`).

Contracts: :mod:`hal.ops.gemm`, :mod:`hal.ops.gemm_v2`, :mod:`hal.ops.gemm_bf16`,
:mod:`hal.ops.indexer`, :mod:`hal.ops.ue8m0`. Names DeepGEMM exports that hal does not provide
(and why) are listed in the README's DeepGEMM table and in :data:`NOT_PROVIDED`.
"""

from __future__ import annotations

import torch

from hal.compat import not_provided
from hal.ops.gemm import (
    gemm_fp8_fp8_bf16_nt,
    get_m_alignment_for_contiguous_layout,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
)
from hal.ops.gemm_bf16 import (
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    k_grouped_bf16_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
)
from hal.ops.gemm_v2 import (
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_nt_skip_head_mid,
    fp8_gemm_tn,
    fp8_gemm_tt,
    get_mk_alignment_for_contiguous_layout,
    get_theoretical_mk_alignment_for_contiguous_layout,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    set_mk_alignment_for_contiguous_layout,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from hal.ops.indexer import (
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
)
from hal.ops.fp4 import cast_back_from_fp4, per_token_cast_to_fp4, transpose_packed_fp4
from hal.ops.mla_schedule import default_num_sms
from hal.ops.ue8m0 import (
    ceil_to_ue8m0,
    expect_scales,
    get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp8,
    transform_sf_into_required_layout,
    unpack_ue8m0_from_int,
)

# The fp8_fp4 spellings take FP8 operands here; FP4 (int8 packed) operands raise OperatorNotSupportedError.
fp8_fp4_gemm_nt, fp8_fp4_gemm_nn, fp8_fp4_gemm_tn, fp8_fp4_gemm_tt = fp8_gemm_nt, fp8_gemm_nn, fp8_gemm_tn, fp8_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nn_contiguous = m_grouped_fp8_gemm_nn_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
# DeepGEMM's legacy aliases
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
bf16_m_grouped_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout

__all__ = [
    # current FP8 names
    "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "fp8_gemm_nt_skip_head_mid",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_fp8_gemm_tn_contiguous",
    "fp8_fp4_gemm_nt", "fp8_fp4_gemm_nn", "fp8_fp4_gemm_tn", "fp8_fp4_gemm_tt",
    "m_grouped_fp8_fp4_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nn_contiguous", "m_grouped_fp8_fp4_gemm_nt_masked",
    # BF16
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nn_contiguous", "m_grouped_bf16_gemm_nt_masked",
    "bf16_m_grouped_gemm_nt_masked", "k_grouped_bf16_gemm_tn_contiguous",
    # v1 names
    "gemm_fp8_fp8_bf16_nt", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    # indexer
    "fp8_mqa_logits", "fp8_paged_mqa_logits", "fp8_fp4_mqa_logits", "fp8_fp4_paged_mqa_logits", "get_paged_mqa_logits_metadata",
    # layout and alignment
    "get_m_alignment_for_contiguous_layout", "get_k_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "set_mk_alignment_for_contiguous_layout", "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_col_major_tma_aligned_tensor", "get_mn_major_tma_aligned_tensor", "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor", "transform_sf_into_required_layout", "get_tma_aligned_size",
    # casts and UE8M0 (deep_gemm.utils)
    "per_token_cast_to_fp8", "per_channel_cast_to_fp8", "per_block_cast_to_fp8", "per_custom_dims_cast_to_fp8",
    "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int", "ceil_div", "align",
    "per_token_cast_to_fp4", "transpose_packed_fp4", "cast_back_from_fp4",
    # runtime configuration
    "set_num_sms", "get_num_sms", "set_tc_util", "get_tc_util", "set_pdl", "get_pdl", "set_ignore_compile_dims", "set_block_size_multiple_of",
    "NOT_PROVIDED", "utils", "testing",
]

# DeepGEMM names hal does not provide, and why (the README's table is built from the same facts).
NOT_PROVIDED: dict[str, str] = {
    "cublaslt_gemm_nt, cublaslt_gemm_nn, cublaslt_gemm_tn, cublaslt_gemm_tt": "thin wrappers over NVIDIA's cuBLASLt, a baseline for DeepGEMM's benchmarks; use torch.matmul",
    "einsum, fp8_einsum": "DeepGEMM's einsum kernels (bhr,hdr->bhd and friends) are not in unihal's contracts yet",
    "tf32_hc_prenorm_gemm": "the hyper-connection pre-norm GEMM of a later model, not in unihal's contracts yet",
    "SymmBuffer, get_symm_buffer_for_mega_moe, transform_weights_for_mega_moe, fp8_fp4_mega_moe, bf16_mega_moe":
        "the fused 'mega MoE' kernels over NVSHMEM symmetric memory (SM100); hal composes EP dispatch + grouped GEMMs instead",
    "legacy": "DeepGEMM's A100 Triton kernels; hal's Triton backends are the portable path",
    "init_dist, uneven_all_gather": "test utilities of deep_gemm.utils.dist",
    "FP4 operands (fp8_fp4_* with int8 packed e2m1)": "SM100's FP4 recipe; the fp8_fp4 spellings here take FP8 and raise OperatorNotSupportedError for FP4",
}

# The DeepGEMM release whose Python API this module follows (code that gates on the version reads it).
__version__ = "2.6.1"

_num_sms: int | None = None
_tc_util = 100
_pdl = False


def ceil_div(x: int, y: int) -> int:
    """Ceiling of x / y for non-negative integers."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """x rounded up to a multiple of y."""
    return ceil_div(x, y) * y


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """x rounded up so that x * element_size is a multiple of 16 bytes (TMA's alignment)."""
    alignment = 16 // element_size
    return ceil_div(x, alignment) * alignment


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """DeepGEMM v1's name of :func:`get_mn_major_tma_aligned_tensor` ([M, K] or [G, M, K], MN-major, M padded)."""
    return get_mn_major_tma_aligned_tensor(expect_scales("get_col_major_tma_aligned_tensor", "x", x))  # a ShapeError is a ValueError too


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


def set_tc_util(value: int) -> None:
    """DeepGEMM's tensor-core utilisation hint (percent); recorded, no effect on hal's kernels."""
    global _tc_util
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100:
        raise ValueError(f"set_tc_util: expected an int in (0, 100], got {value!r}")
    _tc_util = value


def get_tc_util() -> int:
    return _tc_util


def set_pdl(enabled: bool) -> None:
    """Programmatic dependent launch (a CUDA launch attribute); recorded, no effect on hal's kernels."""
    global _pdl
    _pdl = bool(enabled)


def get_pdl() -> bool:
    return _pdl


def set_ignore_compile_dims(ignore: bool) -> None:
    """A JIT specialisation hint of DeepGEMM's; hal's kernels take every dimension at run time."""


def set_block_size_multiple_of(value: int | tuple[int, int]) -> None:
    """A JIT tile-size hint of DeepGEMM's (one multiple for M and N, or an (M, N) pair); hal's
    backends choose their own tiles."""
    values = value if isinstance(value, tuple) and len(value) == 2 else (value,)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"set_block_size_multiple_of: expected a positive int or a pair of them, got {value!r}")


def __getattr__(name: str):
    raise not_provided("deep_gemm", NOT_PROVIDED, name)


from hal.compat.deep_gemm import testing, utils  # noqa: E402  (DeepGEMM's submodules; they import names defined above)
