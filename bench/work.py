"""The work each operator does for given inputs: minimum bytes moved and FLOPs.

Bytes count each input read once and each output written once (what a perfect kernel moves);
FLOPs count multiply-adds as two. The bound a case is judged against is whichever of
bytes / copy bandwidth and FLOPs / matmul rate is larger.

Which matmul rate: the bfloat16 one where the operator's products can run in bf16 with fp32
accumulation without changing its numerics, i.e. its operands are bf16 or FP8 (e4m3 values are
exact in bf16): MLA decode on a bf16 cache, the sparse and V3.2 MLA kernels, the indexer's
logits, every FP8 and bf16 GEMM. Otherwise (fp16 or fp32 operands, whose values bf16 cannot
hold; operators with no matmul) the float32 rate. :attr:`Work.compute_dtype` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hal.conformance.case import Tensors
from hal.ops.mla import HEAD_DIM_QK, HEAD_DIM_V

__all__ = ["Work", "work_of", "compute_dtype"]


@dataclass(frozen=True)
class Work:
    """Minimum bytes moved and FLOPs; ``compute_dtype`` names the matmul peak the FLOPs are
    judged against (``bfloat16`` or ``float32``, see the module docstring)."""

    bytes: float
    flops: float
    compute_dtype: str = "float32"


def _nbytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def _mla(inputs: Tensors) -> Work:
    q = inputs["q"]
    batch, s_q, h_q, _ = q.shape
    keys = float(inputs["cache_seqlens"].sum())
    item = q.element_size()
    kv_bytes = keys * HEAD_DIM_QK * item  # each sequence's keys once; V is inside K
    out_bytes = batch * s_q * h_q * (HEAD_DIM_V * item + 4)
    flops = 2.0 * s_q * h_q * keys * (HEAD_DIM_QK + HEAD_DIM_V)
    return Work(_nbytes(q, inputs["block_table"]) + kv_bytes + out_bytes, flops)


def _keys_per_row(indices: torch.Tensor, length: torch.Tensor | None) -> torch.Tensor:
    """Valid keys each (batch, token) row of a sparse index list attends to: [batch, s_q]."""
    valid = indices >= 0
    if length is not None:
        valid &= torch.arange(indices.shape[-1])[None, None, :] < length.view(-1, 1, 1)
    return valid.sum(-1).double()


def _mla_v2(inputs: Tensors) -> Work:
    if inputs["indices"] is None:  # dense: the v1 model with the cache's own bytes per key
        dense = _mla(inputs)
        per_key = 656 if inputs["fp8"] else HEAD_DIM_QK * inputs["q"].element_size()
        keys = float(inputs["cache_seqlens"].sum())
        return Work(dense.bytes + keys * (per_key - HEAD_DIM_QK * inputs["q"].element_size()), dense.flops)
    q = inputs["q"]
    batch, s_q, h_q, _ = q.shape
    per_key = 656 if inputs["fp8"] else HEAD_DIM_QK * q.element_size()
    keys = _keys_per_row(inputs["indices"], inputs["topk_length"])
    if inputs["extra_indices"] is not None:
        keys = keys + _keys_per_row(inputs["extra_indices"], inputs["extra_topk_length"])
    total = float(keys.sum())
    out_bytes = batch * s_q * h_q * (HEAD_DIM_V * q.element_size() + 4)
    return Work(_nbytes(q, inputs["indices"]) + total * per_key + out_bytes, 2.0 * h_q * total * (HEAD_DIM_QK + HEAD_DIM_V))


def _sparse_prefill(inputs: Tensors) -> Work:
    q, kv, indices = inputs["q"], inputs["kv"], inputs["indices"]
    s_q, h_q, _ = q.shape
    group = h_q // kv.shape[1]
    valid = (indices >= 0) & (indices < kv.shape[0])
    if inputs["topk_length"] is not None:
        valid &= torch.arange(indices.shape[-1])[None, None, :] < inputs["topk_length"].view(-1, 1, 1)
    keys = float(valid.sum())  # (token, KV head) key reads
    out_bytes = s_q * h_q * (HEAD_DIM_V * 2 + 8)
    return Work(_nbytes(q, indices) + keys * HEAD_DIM_QK * kv.element_size() + out_bytes, 2.0 * group * keys * (HEAD_DIM_QK + HEAD_DIM_V))


def _quantize_cache(inputs: Tensors) -> Work:
    x = inputs["k_cache"]
    tokens = x.shape[0] * x.shape[1]
    return Work(tokens * (HEAD_DIM_QK * x.element_size() + 656), 0.0)


def _mqa_logits(inputs: Tensors) -> Work:
    """The anchor's model: 2·H·D FLOPs per (row, key) a row sees; q, keys, weights read once, logits written."""
    q, keys = inputs["q"], inputs["keys"]
    seq_len, heads, dim = q.shape
    seen = float((inputs["end"].long() - inputs["start"].long()).clamp(min=0).sum())
    width = inputs["max_seqlen_k"] or keys.shape[0]
    out_bytes = seq_len * width * (2 if inputs["bf16"] else 4)
    return Work(_nbytes(q, keys, inputs["scales"], inputs["weights"], inputs["start"], inputs["end"]) + out_bytes, 2.0 * heads * dim * seen)


def _paged_mqa_logits(inputs: Tensors) -> Work:
    """Each sequence's keys (D bytes + a 4-byte scale) read once for its next_n rows; 2·H·D FLOPs per seen (row, key)."""
    from hal.ops.indexer_reference import visible_lengths

    q = inputs["q"]
    batch, next_n, heads, dim = q.shape
    visible = visible_lengths(inputs["context_lens"], next_n).double()
    keys_read = float(visible.amax(dim=1).sum()) if batch else 0.0
    out_bytes = batch * next_n * inputs["max_context_len"] * (2 if inputs["bf16"] else 4)
    bytes_ = _nbytes(q, inputs["weights"], inputs["context_lens"], inputs["block_table"]) + keys_read * (dim + 4) + out_bytes
    return Work(bytes_, 2.0 * heads * dim * float(visible.sum()))


def _gemm_rows(inputs: Tensors) -> float:
    """Rows a GEMM computes: the grouped layouts' valid rows, else all of A's."""
    if "m_indices" in inputs:
        return float((inputs["m_indices"] >= 0).sum())
    if "masked_m" in inputs:
        return float(inputs["masked_m"].sum())
    return float(inputs["a"].shape[0])


def _gemm(inputs: Tensors) -> Work:
    a, b, out = inputs["a"], inputs["b"], inputs["out"] if "out" in inputs else inputs["d"]
    k, n, rows = a.shape[-1], b.shape[-2], _gemm_rows(inputs)
    bytes_ = rows * k + _nbytes(b, inputs["sb"]) + rows * (k // 128) * 4 + rows * n * out.element_size()
    return Work(bytes_, 2.0 * rows * n * k)


def _gemm_bf16(inputs: Tensors) -> Work:
    """bf16 operands (2 bytes), one output write (and one c read when accumulating)."""
    a, b, d = inputs["a"], inputs["b"], inputs["d"]
    k, n, rows = a.shape[-1], b.shape[-2], _gemm_rows(inputs)
    c_bytes = d.element_size() * rows * n if inputs.get("c") is not None else 0.0
    return Work(rows * k * 2 + _nbytes(b) + rows * n * d.element_size() + c_bytes, 2.0 * rows * n * k)


def _cast(inputs: Tensors) -> Work:
    x = inputs["x"]
    return Work(_nbytes(x) + x.numel() * (1 + 4 / 128), 0.0)


def _layout(inputs: Tensors) -> Work:
    topk = inputs["topk_idx"]
    ranks = inputs["num_ranks"]
    return Work(_nbytes(topk) + topk.shape[0] * ranks + 4 * (ranks + inputs["num_experts"]), 0.0)


def _pack(inputs: Tensors) -> Work:
    rows, buckets = inputs["rows"], inputs["bucket_idx"]
    row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
    copies = float((buckets >= 0).sum())
    return Work(_nbytes(rows, buckets) + copies * (row_bytes + 4), 0.0)


def _unpack(inputs: Tensors) -> Work:
    rows = inputs["rows"]
    return Work(2 * _nbytes(rows) + _nbytes(inputs["bucket_of_row"]), 0.0)


def _combine_reduce(inputs: Tensors) -> Work:
    rows = inputs["rows"]
    out_bytes = inputs["num_tokens"] * (rows[0].numel() if rows.shape[0] else 0) * rows.element_size()
    weights = inputs["weights"]
    return Work(_nbytes(rows, inputs["src_idx"]) + (_nbytes(weights) if weights is not None else 0) + out_bytes, 2.0 * rows.numel())


_WORK = {
    "mla_decode": _mla,
    "mla_decode_v2": _mla_v2,
    "mla_sparse_prefill": _sparse_prefill,
    "quantize_mla_kv_cache": _quantize_cache,
    "mqa_logits": _mqa_logits,
    "paged_mqa_logits": _paged_mqa_logits,
    "gemm_fp8_nt": _gemm,
    "gemm_bf16_nt": _gemm_bf16,
    "m_grouped_gemm_bf16_nt_contiguous": _gemm_bf16,
    "m_grouped_gemm_bf16_nt_masked": _gemm_bf16,
    "m_grouped_gemm_fp8_nt_contiguous": _gemm,
    "m_grouped_gemm_fp8_nt_masked": _gemm,
    "per_token_cast_to_fp8": _cast,
    "per_block_cast_to_fp8": _cast,
    "ep_dispatch_layout": _layout,
    "ep_pack": _pack,
    "ep_unpack": _unpack,
    "ep_combine_reduce": _combine_reduce,
}


# The operand whose dtype decides the compute bound, for operators that multiply matrices.
_MATMUL_OPERAND = {
    "mla_decode": "q", "mla_decode_v2": "q", "mla_sparse_prefill": "q", "mqa_logits": "q", "paged_mqa_logits": "q",
    "gemm_fp8_nt": "a", "gemm_bf16_nt": "a", "m_grouped_gemm_bf16_nt_contiguous": "a", "m_grouped_gemm_bf16_nt_masked": "a",
    "m_grouped_gemm_fp8_nt_contiguous": "a", "m_grouped_gemm_fp8_nt_masked": "a",
}
_BF16_EXACT = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def compute_dtype(op: str, inputs: Tensors) -> str:
    """``bfloat16`` when ``op`` multiplies operands whose values bf16 holds exactly, else ``float32``."""
    operand = inputs.get(_MATMUL_OPERAND.get(op, ""))
    return "bfloat16" if isinstance(operand, torch.Tensor) and operand.dtype in _BF16_EXACT else "float32"


def work_of(op: str, inputs: Tensors) -> Work:
    """The work of one call of ``op`` on ``inputs`` (the catalogue family's input dict)."""
    work = _WORK[op](inputs)
    return Work(work.bytes, work.flops, compute_dtype(op, inputs))
