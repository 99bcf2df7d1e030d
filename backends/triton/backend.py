"""A hal backend made of the shared Triton kernels: what a GPU vendor instantiates.

A vendor plugin module detects its hardware (a :class:`Target`), picks a :class:`Tuning` and
exposes ``backend = TritonBackend(...)``, registered as ``"hal.backends.<vendor>.plugin:backend"``.
Every operator hook is implemented here once; kernel modules are imported on first use so that
discovery never imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from hal.backends.triton.tuning import Tuning
from hal.errors import OperatorNotSupportedError
from hal.plugin import Availability, BackendInfo, current_contracts, hookimpl

__all__ = ["Target", "TritonBackend"]


@dataclass(frozen=True)
class Target:
    """Where kernels run: ``available``, ``simulated`` (Triton's CPU interpreter), a description of
    the device or the reason it is unavailable, and the vendor's device identity (capability,
    gfx arch) when there is one."""

    available: bool
    simulated: bool
    description: str
    identity: str = ""


class TritonBackend:
    """Hook implementations over the shared kernels for one target.

    Args:
        description: one line for ``hal backends``.
        target: the detected device.
        tuning: tile tables, FP8 format and launch options for it.
        device_type: torch device type of the GPU's tensors (``"cuda"`` for NVIDIA and ROCm).
    """

    def __init__(self, description: str, target: Target, tuning: Tuning, device_type: str = "cuda") -> None:
        self.description = description
        self.target = target
        self.tuning = tuning
        self.device_type = device_type

    @hookimpl
    def hal_backend_info(self) -> BackendInfo:
        # ep_combine_reduce at version 1: this backend runs the reference reduction, which would
        # only concatenate segments (a combine then keeps copying its own rows, one pass cheaper).
        # mla_decode_v2 at version 1: the sparse kernel reads the 656-byte V3.2 cache, not MODEL1's pages.
        contracts = current_contracts() | {"ep_combine_reduce": 1, "mla_decode_v2": 1}
        if self.target.simulated:
            # A simulator is never picked automatically: it is slow and proves numerics, not speed.
            return BackendInfo(
                f"{self.description} (simulated in the Triton CPU interpreter)", priority=-1, device_types=("cpu",),
                contract_versions=contracts,
            )
        return BackendInfo(self.description, priority=100, device_types=(self.device_type,), contract_versions=contracts)

    @hookimpl
    def hal_backend_availability(self) -> Availability:
        if not self.target.available:
            return Availability(False, self.target.description)
        return Availability(True, device=f"{self.target.description}; tuning {self.tuning.name}", simulated=self.target.simulated)

    @hookimpl
    def hal_get_mla_metadata(self, cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
        # On the device, in one program: no host round trip, so get_mla_metadata() schedules are
        # filled inside a CUDA graph capture as well.
        from hal.backends.triton.schedule import schedule_mla_splits_on_device

        return schedule_mla_splits_on_device(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)

    @hookimpl
    def hal_mla_decode(self, q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
        from hal.backends.triton.mla_decode import mla_decode

        return mla_decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal, tuning=self.tuning
        )

    @hookimpl
    def hal_mla_decode_v2(
        self, q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
        extra_k_cache, extra_indices, topk_length, extra_topk_length,
    ):
        from hal.backends.triton.mla_sparse import mla_decode_sparse
        from hal.ops.mla_v2 import dense_window_indices

        if indices is None:
            # The dense mode is the sparse kernel over each token's causal window, listed on the device.
            if k_cache.shape[2] != 1:
                raise OperatorNotSupportedError(
                    f"mla_decode_v2: the Triton dense V3.2 mode takes one latent KV head (h_kv = 1), not {k_cache.shape[2]}; "
                    "select the reference for it: HAL_BACKEND_MLA_DECODE_V2=cuda,reference"
                )
            indices = dense_window_indices(block_table, cache_seqlens, q.shape[1], k_cache.shape[1], causal and q.shape[1] > 1)
        return mla_decode_sparse(
            q, k_cache, softmax_scale, is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices, topk_length, extra_topk_length,
            tuning=self.tuning,
        )

    @hookimpl
    def hal_mla_sparse_prefill(self, q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
        from hal.backends.triton.mla_sparse import mla_sparse_prefill

        return mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, tuning=self.tuning)

    @hookimpl
    def hal_quantize_mla_kv_cache(self, k_cache):
        from hal.backends.triton.mla_sparse import quantize_mla_kv_cache

        return quantize_mla_kv_cache(k_cache)

    @hookimpl
    def hal_mqa_logits(self, q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
        from hal.backends.triton.indexer import mqa_logits

        return mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype, tuning=self.tuning)

    @hookimpl
    def hal_paged_mqa_logits(self, q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype):
        from hal.backends.triton.indexer import paged_mqa_logits

        return paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype, tuning=self.tuning)

    @hookimpl
    def hal_gemm_fp8_nt(self, a, a_scales, b, b_scales, out):
        from hal.backends.triton.fp8_gemm import DENSE, fp8_gemm

        fp8_gemm(a, a_scales, b, b_scales, out, tuning=self.tuning, layout=DENSE)

    @hookimpl
    def hal_m_grouped_gemm_fp8_nt_contiguous(self, a, a_scales, b, b_scales, out, m_indices):
        import dataclasses

        from hal.backends.triton.fp8_gemm import CONTIGUOUS, fp8_gemm
        from hal.ops.gemm import get_m_alignment_for_contiguous_layout

        # A tile takes its group from its first row: its rows must never span two aligned segments.
        config = self.tuning.gemm(a.shape[0], b.shape[1], a.shape[1])
        align = get_m_alignment_for_contiguous_layout()
        if align % config.block_m:
            config = dataclasses.replace(config, block_m=max(16, align & -align))
        fp8_gemm(a, a_scales, b, b_scales, out, tuning=self.tuning, layout=CONTIGUOUS, groups=m_indices, config=config)

    @hookimpl
    def hal_m_grouped_gemm_fp8_nt_masked(self, a, a_scales, b, b_scales, out, masked_m, expected_m):
        from hal.backends.triton.fp8_gemm import MASKED, fp8_gemm

        # DeepGEMM's expected_m: the typical rows per group picks the tile, not M_max (the persistent
        # launch walks every tile up to M_max either way, so any masked_m is computed).
        config = self.tuning.gemm(min(max(expected_m, 1), a.shape[1]), b.shape[1], a.shape[2])
        fp8_gemm(a, a_scales, b, b_scales, out, tuning=self.tuning, layout=MASKED, groups=masked_m, config=config)

    @hookimpl
    def hal_gemm_bf16_nt(self, a, b, out):
        from hal.backends.triton.fp8_gemm import DENSE, bf16_gemm

        bf16_gemm(a, b, out, tuning=self.tuning, layout=DENSE)

    @hookimpl
    def hal_m_grouped_gemm_bf16_nt_contiguous(self, a, b, out, m_indices):
        import dataclasses

        from hal.backends.triton.fp8_gemm import CONTIGUOUS, bf16_gemm
        from hal.ops.gemm import get_m_alignment_for_contiguous_layout

        config = self.tuning.gemm(a.shape[0], b.shape[1], a.shape[1])
        align = get_m_alignment_for_contiguous_layout()
        if align % config.block_m:
            config = dataclasses.replace(config, block_m=max(16, align & -align))
        bf16_gemm(a, b, out, tuning=self.tuning, layout=CONTIGUOUS, groups=m_indices, config=config)

    @hookimpl
    def hal_m_grouped_gemm_bf16_nt_masked(self, a, b, out, masked_m, expected_m):
        from hal.backends.triton.fp8_gemm import MASKED, bf16_gemm

        config = self.tuning.gemm(min(max(expected_m, 1), a.shape[1]), b.shape[1], a.shape[2])  # as the FP8 masked GEMM
        bf16_gemm(a, b, out, tuning=self.tuning, layout=MASKED, groups=masked_m, config=config)

    @hookimpl
    def hal_per_token_cast_to_fp8(self, x):
        from hal.backends.triton.fp8_cast import per_token_cast

        return per_token_cast(x)

    @hookimpl
    def hal_per_block_cast_to_fp8(self, x):
        from hal.backends.triton.fp8_cast import per_block_cast

        return per_block_cast(x)

    @hookimpl
    def hal_ep_dispatch_layout(self, topk_idx, num_experts, num_ranks):
        from hal.backends.triton.ep_layout import dispatch_layout

        return dispatch_layout(topk_idx, num_experts, num_ranks)

    # The expert-parallel local steps are data movement: until Triton kernels replace them, the
    # references (torch indexing, any device) run on the GPU's tensors.
    @hookimpl
    def hal_ep_pack(self, rows, bucket_idx, num_buckets):
        from hal.ops.ep_local import pack_reference

        return pack_reference(rows, bucket_idx, num_buckets)

    @hookimpl
    def hal_ep_unpack(self, rows, bucket_of_row, num_buckets, num_slots):
        from hal.ops.ep_local import unpack_reference

        return unpack_reference(rows, bucket_of_row, num_buckets, num_slots)

    @hookimpl
    def hal_ep_combine_reduce(self, rows, src_idx, num_tokens, weights):
        from hal.ops.ep_local import combine_reduce_reference

        return combine_reduce_reference(rows, src_idx, num_tokens, weights)
