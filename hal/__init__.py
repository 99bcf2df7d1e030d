"""unihal: one interface for DeepSeek-class LLM kernels, with vendor backends as plugins.

Operators (validated here, run on the selected backend)::

    hal.get_mla_metadata, hal.flash_mla_with_kvcache                  # MLA decode (FlashMLA), V3.2 arguments too
    hal.flash_mla_sparse_fwd, hal.quantize_mla_kv_cache               # sparse prefill, the FP8 KV cache
    hal.fp8_mqa_logits, hal.fp8_paged_mqa_logits                      # V3.2 indexer logits (DeepGEMM)
    hal.gemm_fp8_fp8_bf16_nt, hal.fp8_gemm_nt/nn/tn/tt                # FP8 GEMM (DeepGEMM v1 and current names)
    hal.bf16_gemm_nt/nn/tn/tt, hal.k_grouped_*                        # BF16 GEMMs, MoE weight gradients
    hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous / _masked           # MoE grouped FP8 GEMM
    hal.per_token_cast_to_fp8, hal.per_block_cast_to_fp8              # FP8 quantisation
    hal.get_dispatch_layout                                           # EP layout (DeepEP)
    hal.ep_pack, hal.ep_unpack, hal.ep_combine_reduce                 # EP local kernels
    hal.rebalance_experts                                             # EPLB (host-side planner)

Expert parallelism across processes: ``hal.ep.Buffer(group)`` (DeepEP's dispatch/combine API on
torch.distributed); see :mod:`hal.ep`.

Backend selection: ``HAL_BACKEND=name`` or ``HAL_BACKEND=a,b`` (fallback chain),
``HAL_BACKEND_<OPERATOR>=name`` per operator, :func:`use_backend` in code; see
:mod:`hal.selection`. ``hal backends`` shows what this machine has.
"""

from hal.errors import (
    ArgumentError,
    BackendError,
    BackendUnavailableError,
    DeviceError,
    DTypeError,
    FeatureNotSupportedError,
    HalError,
    LayoutError,
    OperatorNotSupportedError,
    ShapeError,
    UnknownBackendError,
    ValueRangeError,
)
from hal.operator import OPERATORS, Operator
from hal.registry import Backend, get_backend
from hal.registry import backends as list_backends
from hal.selection import Selection, carry_backend, select, use_backend
from hal.ops.ep import get_dispatch_layout
from hal.ops.ep_local import ep_combine_reduce, ep_pack, ep_unpack
from hal.ops.eplb import rebalance_experts
from hal.ops.fp8_quant import per_block_cast_to_fp8, per_token_cast_to_fp8
from hal.ops.gemm import (
    get_m_alignment_for_contiguous_layout,
    gemm_fp8_fp8_bf16_nt,
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
    fp8_gemm_tn,
    fp8_gemm_tt,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from hal.ops.indexer import (
    fp8_fp4_mqa_logits,
    fp8_fp4_paged_mqa_logits,
    fp8_mqa_logits,
    fp8_paged_mqa_logits,
    get_paged_mqa_logits_metadata,
    pack_paged_indexer_cache,
    quantize_indexer_keys,
)
from hal.ops.mla import flash_mla_with_kvcache, get_mla_metadata
from hal.ops.mla_fp8_cache import dequantize_mla_kv_cache, dequantize_model1_kv_cache, quantize_mla_kv_cache, quantize_model1_kv_cache
from hal.ops.mla_v2 import MLASchedule, flash_mla_sparse_fwd
from hal import ep  # noqa: E402  (after the operators it is built on)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # operators
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
    "MLASchedule",
    "quantize_mla_kv_cache",
    "quantize_model1_kv_cache",
    "dequantize_model1_kv_cache",
    "dequantize_mla_kv_cache",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "get_paged_mqa_logits_metadata",
    "quantize_indexer_keys",
    "pack_paged_indexer_cache",
    "gemm_fp8_fp8_bf16_nt",
    "fp8_gemm_nt",
    "fp8_gemm_nn",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous",
    "bf16_gemm_nt",
    "bf16_gemm_nn",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "k_grouped_bf16_gemm_tn_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "get_m_alignment_for_contiguous_layout",
    "per_token_cast_to_fp8",
    "per_block_cast_to_fp8",
    "get_dispatch_layout",
    "ep_pack",
    "ep_unpack",
    "ep_combine_reduce",
    "ep",
    "rebalance_experts",
    # backends and selection
    "Backend",
    "list_backends",
    "get_backend",
    "Operator",
    "OPERATORS",
    "Selection",
    "select",
    "use_backend",
    "carry_backend",
    # errors
    "HalError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "LayoutError",
    "ValueRangeError",
    "BackendError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "OperatorNotSupportedError",
    "FeatureNotSupportedError",
]
