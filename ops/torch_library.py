"""Every dispatched operator as a torch custom op (``torch.ops.hal.*``) with a fake implementation.

Under ``torch.compile`` the public functions in ``hal.ops`` call these ops instead of running
their Python checks and dispatch, so Dynamo sees one opaque node per operator (``fullgraph=True``
works) and fake tensors give the output shapes. At run time each op runs the public function
eagerly: same checks, same backend selection. In-place GEMMs declare ``out`` as mutated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hal.selection import select
from hal.ops import ep as ep_ops
from hal.ops import ep_local
from hal.ops import fp8_quant, gemm, gemm_bf16, gemm_v2, indexer, mla, mla_fp8_cache, mla_v2
from hal.ops.mla_schedule import BLOCK_SIZE_M, METADATA_WIDTH, default_num_sms

__all__ = ["compiling"]


def compiling() -> bool:
    """True while Dynamo traces: public operators then route through ``torch.ops.hal``."""
    return torch.compiler.is_compiling()


@torch.library.custom_op("hal::get_mla_metadata", mutates_args=())
def get_mla_metadata(cache_seqlens: Tensor, num_q_tokens_per_head_k: int, num_heads_k: int) -> tuple[Tensor, Tensor]:
    return mla.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


@get_mla_metadata.register_fake
def _(cache_seqlens: Tensor, num_q_tokens_per_head_k: int, num_heads_k: int) -> tuple[Tensor, Tensor]:
    parts = max(default_num_sms(cache_seqlens.device) // num_heads_k // -(-num_q_tokens_per_head_k // BLOCK_SIZE_M), 1)
    # A backend's own scheduler may say how many parts it makes (OpenCL: one, unsplit).
    scheduler = select(mla.MLA_DECODE, cache_seqlens.device.type, device_arg="cache_seqlens").backend.impl("hal_get_mla_metadata")
    parts = getattr(scheduler, "num_sm_parts", parts)
    return cache_seqlens.new_empty(parts, METADATA_WIDTH), cache_seqlens.new_empty(cache_seqlens.shape[0] + 1)


@torch.library.custom_op("hal::mla_decode", mutates_args=())
def mla_decode(
    q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
    tile_scheduler_metadata: Tensor, num_splits: Tensor, softmax_scale: float | None, causal: bool,
) -> tuple[Tensor, Tensor]:
    return mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)


@mla_decode.register_fake
def _(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    batch, s_q, h_q, _ = q.shape
    return q.new_empty(batch, s_q, h_q, head_dim_v), q.new_empty(batch, h_q, s_q, dtype=torch.float32)


@torch.library.custom_op("hal::gemm_fp8_nt", mutates_args=("out",))
def gemm_fp8_nt(a: Tensor, a_scales: Tensor, b: Tensor, b_scales: Tensor, out: Tensor) -> None:
    gemm.gemm_fp8_fp8_bf16_nt((a, a_scales), (b, b_scales), out)


@gemm_fp8_nt.register_fake
def _(a, a_scales, b, b_scales, out) -> None:
    return None


@torch.library.custom_op("hal::m_grouped_gemm_fp8_nt_contiguous", mutates_args=("out",))
def m_grouped_gemm_fp8_nt_contiguous(a: Tensor, a_scales: Tensor, b: Tensor, b_scales: Tensor, out: Tensor, m_indices: Tensor) -> None:
    gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, a_scales), (b, b_scales), out, m_indices)


@m_grouped_gemm_fp8_nt_contiguous.register_fake
def _(a, a_scales, b, b_scales, out, m_indices) -> None:
    return None


@torch.library.custom_op("hal::m_grouped_gemm_fp8_nt_masked", mutates_args=("out",))
def m_grouped_gemm_fp8_nt_masked(a: Tensor, a_scales: Tensor, b: Tensor, b_scales: Tensor, out: Tensor, masked_m: Tensor, expected_m: int) -> None:
    gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, a_scales), (b, b_scales), out, masked_m, expected_m)


@m_grouped_gemm_fp8_nt_masked.register_fake
def _(a, a_scales, b, b_scales, out, masked_m, expected_m) -> None:
    return None


@torch.library.custom_op("hal::per_token_cast_to_fp8", mutates_args=())
def per_token_cast_to_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    return fp8_quant.per_token_cast_to_fp8(x)


@per_token_cast_to_fp8.register_fake
def _(x):
    m, k = x.shape
    return x.new_empty(m, k, dtype=torch.float8_e4m3fn), x.new_empty(m, k // fp8_quant.BLOCK, dtype=torch.float32)


@torch.library.custom_op("hal::per_block_cast_to_fp8", mutates_args=())
def per_block_cast_to_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    return fp8_quant.per_block_cast_to_fp8(x)


@per_block_cast_to_fp8.register_fake
def _(x):
    n, k = x.shape
    blocks = (-(-n // fp8_quant.BLOCK), -(-k // fp8_quant.BLOCK))
    return x.new_empty(n, k, dtype=torch.float8_e4m3fn), x.new_empty(*blocks, dtype=torch.float32)


@torch.library.custom_op("hal::get_dispatch_layout", mutates_args=())
def get_dispatch_layout(topk_idx: Tensor, num_experts: int, num_ranks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    per_rank, per_node, per_expert, in_rank = ep_ops.get_dispatch_layout(topk_idx, num_experts, num_ranks)
    # Custom ops cannot return None: within a node the per-node counts travel as an empty tensor.
    per_node = per_node if per_node is not None else per_rank.new_empty(0)
    return per_rank, per_node, per_expert, in_rank


@get_dispatch_layout.register_fake
def _(topk_idx, num_experts, num_ranks):
    nodes = num_ranks // ep_ops.NVL_PEERS_PER_NODE if num_ranks > ep_ops.NVL_PEERS_PER_NODE else 0
    counts = topk_idx.new_empty(num_ranks, dtype=torch.int32)
    return counts, topk_idx.new_empty(nodes, dtype=torch.int32), topk_idx.new_empty(num_experts, dtype=torch.int32), topk_idx.new_empty(
        topk_idx.shape[0], num_ranks, dtype=torch.bool
    )


@torch.library.custom_op("hal::ep_pack", mutates_args=())
def ep_pack(rows: Tensor, bucket_idx: Tensor, num_buckets: int) -> tuple[Tensor, Tensor, Tensor]:
    return ep_local.ep_pack(rows, bucket_idx, num_buckets)


@ep_pack.register_fake
def _(rows, bucket_idx, num_buckets):
    copies = torch.library.get_ctx().new_dynamic_size()  # how many (row, bucket) pairs are selected
    return (
        rows.new_empty((copies,) + tuple(rows.shape[1:])),
        rows.new_empty(copies, dtype=torch.int32),
        rows.new_empty(num_buckets, dtype=torch.int32),
    )


@torch.library.custom_op("hal::ep_unpack", mutates_args=())
def ep_unpack(rows: Tensor, bucket_of_row: Tensor, num_buckets: int, num_slots: int) -> tuple[Tensor, Tensor]:
    return ep_local.ep_unpack(rows, bucket_of_row, num_buckets, num_slots)


@ep_unpack.register_fake
def _(rows, bucket_of_row, num_buckets, num_slots):
    return rows.new_empty((num_buckets, num_slots) + tuple(rows.shape[1:])), rows.new_empty(num_buckets, dtype=torch.int32)


@torch.library.custom_op("hal::ep_combine_reduce", mutates_args=())
def ep_combine_reduce(rows: Tensor, src_idx: Tensor, num_tokens: int, weights: Tensor | None) -> Tensor:
    return ep_local.ep_combine_reduce(rows, src_idx, num_tokens, weights)


@ep_combine_reduce.register_fake
def _(rows, src_idx, num_tokens, weights):
    return rows.new_empty(num_tokens, rows.shape[1])


# --- DeepSeek-V3.2: the V3.2 decode, sparse prefill, FP8 cache writer, indexer logits ----------


@torch.library.custom_op("hal::mla_decode_v2", mutates_args=())
def mla_decode_v2(
    q: Tensor, k_cache: Tensor, block_table: Tensor | None, cache_seqlens: Tensor | None, head_dim_v: int, softmax_scale: float | None,
    causal: bool, is_fp8_kvcache: bool, indices: Tensor | None, attn_sink: Tensor | None, extra_k_cache: Tensor | None,
    extra_indices_in_kvcache: Tensor | None, topk_length: Tensor | None, extra_topk_length: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return mla.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, mla_v2.MLASchedule(), None, softmax_scale, causal, is_fp8_kvcache, indices,
        attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length,
    )


@mla_decode_v2.register_fake
def _(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
      extra_indices_in_kvcache, topk_length, extra_topk_length):
    batch, s_q, h_q, _ = q.shape
    return q.new_empty(batch, s_q, h_q, head_dim_v), q.new_empty(batch, h_q, s_q, dtype=torch.float32)


@torch.library.custom_op("hal::mla_sparse_prefill", mutates_args=())
def mla_sparse_prefill(
    q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int, attn_sink: Tensor | None, topk_length: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    return mla_v2.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


@mla_sparse_prefill.register_fake
def _(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    s_q, h_q, _ = q.shape
    return q.new_empty(s_q, h_q, d_v, dtype=torch.bfloat16), q.new_empty(s_q, h_q, dtype=torch.float32), q.new_empty(s_q, h_q, dtype=torch.float32)


@torch.library.custom_op("hal::quantize_mla_kv_cache", mutates_args=())
def quantize_mla_kv_cache(k_cache: Tensor) -> Tensor:
    return mla_fp8_cache.quantize_mla_kv_cache(k_cache)


@quantize_mla_kv_cache.register_fake
def _(k_cache):
    return k_cache.new_empty(k_cache.shape[0], k_cache.shape[1], 1, mla_fp8_cache.FP8_TOKEN_BYTES, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("hal::mqa_logits", mutates_args=())
def mqa_logits(
    q: Tensor, k: Tensor, k_scales: Tensor, weights: Tensor, k_start: Tensor, k_end: Tensor, clean_logits: bool, max_seqlen_k: int,
    logits_dtype: torch.dtype,
) -> Tensor:
    return indexer.fp8_fp4_mqa_logits(q, (k, k_scales), weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype)


@mqa_logits.register_fake
def _(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
    return q.new_empty(q.shape[0], max_seqlen_k or k.shape[0], dtype=logits_dtype)


@torch.library.custom_op("hal::paged_mqa_logits", mutates_args=())
def paged_mqa_logits(
    q: Tensor, kv_cache: Tensor, weights: Tensor, context_lens: Tensor, block_table: Tensor, schedule_meta: Tensor, max_context_len: int,
    clean_logits: bool, logits_dtype: torch.dtype, indices: Tensor | None,
) -> Tensor:
    return indexer.fp8_fp4_paged_mqa_logits(
        q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, logits_dtype, indices
    )


@paged_mqa_logits.register_fake
def _(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, logits_dtype, indices):
    return q.new_empty(q.shape[0] * q.shape[1], max_context_len, dtype=logits_dtype)


# --- DeepGEMM's current GEMM names and the BF16 GEMMs (in place on d) ------------------------------


@torch.library.custom_op("hal::fp8_gemm", mutates_args=("d",))
def fp8_gemm(
    a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, d: Tensor, c: Tensor | None, recipe: list[int] | None, recipe_a: list[int] | None,
    recipe_b: list[int] | None, layout: str,
) -> None:
    getattr(gemm_v2, f"fp8_gemm_{layout}")((a, sa), (b, sb), d, c=c, recipe=recipe, recipe_a=recipe_a, recipe_b=recipe_b)


@fp8_gemm.register_fake
def _(a, sa, b, sb, d, c, recipe, recipe_a, recipe_b, layout) -> None:
    return None


@torch.library.custom_op("hal::m_grouped_fp8_gemm_contiguous", mutates_args=("d",))
def m_grouped_fp8_gemm_contiguous(
    a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, d: Tensor, grouped_layout: Tensor, recipe: list[int] | None, recipe_a: list[int] | None,
    recipe_b: list[int] | None, use_psum_layout: bool, transpose_b: bool,
) -> None:
    fn = gemm_v2.m_grouped_fp8_gemm_nn_contiguous if transpose_b else gemm_v2.m_grouped_fp8_gemm_nt_contiguous
    fn((a, sa), (b, sb), d, grouped_layout, recipe=recipe, recipe_a=recipe_a, recipe_b=recipe_b, use_psum_layout=use_psum_layout)


@m_grouped_fp8_gemm_contiguous.register_fake
def _(a, sa, b, sb, d, grouped_layout, recipe, recipe_a, recipe_b, use_psum_layout, transpose_b) -> None:
    return None


# The k-grouped GEMMs with the psum layout read their group ends on the host: one opaque node each,
# which reads them when the graph runs (with host group sizes every group's GEMM is a node of its own).
@torch.library.custom_op("hal::k_grouped_bf16_gemm_tn_psum", mutates_args=("d",))
def k_grouped_bf16_gemm_tn_psum(a: Tensor, b: Tensor, d: Tensor, c: Tensor | None, ends: Tensor) -> None:
    gemm_bf16.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, ends, c=c, use_psum_layout=True)


@k_grouped_bf16_gemm_tn_psum.register_fake
def _(a, b, d, c, ends) -> None:
    return None


@torch.library.custom_op("hal::k_grouped_fp8_gemm_tn_psum", mutates_args=("d",))
def k_grouped_fp8_gemm_tn_psum(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, d: Tensor, c: Tensor | None, ends: Tensor, recipe: list[int]) -> None:
    gemm_v2.k_grouped_fp8_gemm_tn_contiguous((a, sa), (b, sb), d, None, ends, c=c, recipe=recipe, use_psum_layout=True)


@k_grouped_fp8_gemm_tn_psum.register_fake
def _(a, sa, b, sb, d, c, ends, recipe) -> None:
    return None


@torch.library.custom_op("hal::gemm_bf16_nt", mutates_args=("d",))
def gemm_bf16_nt(a: Tensor, b: Tensor, d: Tensor, c: Tensor | None, layout: str) -> None:
    getattr(gemm_bf16, f"bf16_gemm_{layout}")(a, b, d, c=c)


@gemm_bf16_nt.register_fake
def _(a, b, d, c, layout) -> None:
    return None


@torch.library.custom_op("hal::m_grouped_gemm_bf16_nt_contiguous", mutates_args=("d",))
def m_grouped_gemm_bf16_nt_contiguous(a: Tensor, b: Tensor, d: Tensor, grouped_layout: Tensor, use_psum_layout: bool, transpose_b: bool) -> None:
    fn = gemm_bf16.m_grouped_bf16_gemm_nn_contiguous if transpose_b else gemm_bf16.m_grouped_bf16_gemm_nt_contiguous
    fn(a, b, d, grouped_layout, use_psum_layout=use_psum_layout)


@m_grouped_gemm_bf16_nt_contiguous.register_fake
def _(a, b, d, grouped_layout, use_psum_layout, transpose_b) -> None:
    return None


@torch.library.custom_op("hal::m_grouped_gemm_bf16_nt_masked", mutates_args=("d",))
def m_grouped_gemm_bf16_nt_masked(a: Tensor, b: Tensor, d: Tensor, masked_m: Tensor, expected_m: int) -> None:
    gemm_bf16.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)


@m_grouped_gemm_bf16_nt_masked.register_fake
def _(a, b, d, masked_m, expected_m) -> None:
    return None
