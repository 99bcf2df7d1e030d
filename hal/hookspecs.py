"""Every hook a backend may implement: the one file a vendor reads.

A backend plugin is a module with ``@hal.plugin.hookimpl`` functions named as below. Two hooks
describe the backend; each remaining hook is one operator. Operator hooks are never broadcast to
every plugin: unihal validates the arguments (see ``hal.ops``), selects exactly one backend for
the call and invokes that backend's implementation directly. An implementation therefore
receives arguments that already satisfy the contract written in each docstring, and must follow
the numerics of the reference in ``hal.ops`` within the tolerances of ``hal conformance``.

Tensors arrive on a device listed in the backend's ``BackendInfo.device_types``.
"""

from __future__ import annotations

import pluggy
import torch

from hal.plugin import PROJECT, Availability, BackendInfo

hookspec = pluggy.HookspecMarker(PROJECT)


# --- backend description -------------------------------------------------------------------


@hookspec(firstresult=True)
def hal_backend_info() -> BackendInfo:
    """Static description of the backend (priority, accepted device types). Must not fail."""


@hookspec(firstresult=True)
def hal_backend_availability() -> Availability:
    """Probe this machine. Called lazily once per process, bounded in time (``HAL_PROBE_TIMEOUT_S``,
    default 30 s); exceptions, hangs and results that are not an ``Availability`` mark the backend
    unavailable. Keep it cheap and safe: a runtime that may crash belongs in the canary."""


@hookspec(firstresult=True)
def hal_backend_canary_key() -> str:
    """Optional: ask unihal to prove this backend in a child process before it is available.

    Return a string naming everything the runtime's behaviour depends on (library and driver
    versions or file fingerprints, device identity as the OS reports it, kernel sources; see
    :func:`hal.canary.file_fingerprint` and :func:`hal.canary.sources_fingerprint`), computed
    *without initialising the runtime*. unihal then runs the backend's own operators on the quick
    conformance cases in a child process (``python -m hal.canary NAME``) and reports the backend
    available only if every case matches the reference; the verdict is cached on disk under this
    key. Implement it when a driver, compiler or ICD could crash, hang or compute wrong numbers.
    """


# --- MLA decode (FlashMLA) -----------------------------------------------------------------


@hookspec(firstresult=True)
def hal_get_mla_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional: the backend's own split-KV schedule for ``hal_mla_decode``.

    Args:
        cache_seqlens: int32 [batch], number of cached keys per sequence.
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``.
        num_heads_k: ``h_kv`` (1 for MLA).

    Returns:
        ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [batch + 1])``.
        Backends that omit this hook get the contract's scheduler
        (:func:`hal.ops.mla.schedule_mla_splits`); every ``hal_mla_decode`` must accept that one.
    """


@hookspec(firstresult=True)
def hal_mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decode over a paged KV cache.

    Args:
        q: [batch, s_q, h_q, d] bf16/fp16, d = 576 (512 latent + 64 rope).
        k_cache: [num_blocks, 64, h_kv, d], dtype of q; V is its first ``head_dim_v`` channels.
        block_table: int32 [batch, max_blocks_per_seq]; entries used by a sequence are valid ids.
        cache_seqlens: int32 [batch], each <= max_blocks_per_seq * 64.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: a schedule from ``hal_get_mla_metadata``.
        softmax_scale: already resolved (default d ** -0.5 applied by the caller).
        causal: already False when s_q == 1.

    Returns:
        ``(out [batch, s_q, h_q, head_dim_v] dtype of q, lse float32 [batch, h_q, s_q])``.
    """


@hookspec(firstresult=True)
def hal_mla_decode_v2(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    is_fp8_kvcache: bool,
    indices: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    extra_k_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None,
    topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode with FlashMLA's DeepSeek-V3.2 arguments (see :mod:`hal.ops.mla_v2`).

    Args:
        q: [batch, s_q, h_q, 576] bf16/fp16.
        k_cache: [num_blocks, page_block_size, h_kv, 576] dtype of q, or with ``is_fp8_kvcache``
            float8_e4m3fn [num_blocks, page_block_size, 1, 656] (:mod:`hal.ops.mla_fp8_cache`).
        block_table, cache_seqlens: as ``hal_mla_decode`` in the dense mode; ignored (maybe None)
            when ``indices`` is given.
        indices: int32 [batch, s_q, topk] positions ``block * page_block_size + slot``, -1 unused.
        attn_sink: float32 [h_q]; extra_k_cache / extra_indices: a second cache and its indices;
        topk_length / extra_topk_length: int32 [batch] cuts of the index lists.

    Returns:
        ``(out [batch, s_q, h_q, 512] dtype of q, lse float32 [batch, h_q, s_q])`` following
        :func:`hal.ops.mla_v2_reference.mla_decode_v2_reference`.
    """


@hookspec(firstresult=True)
def hal_mla_sparse_prefill(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: torch.Tensor | None,
    topk_length: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill (``flash_mla_sparse_fwd``): q bf16 [s_q, h_q, 576], kv bf16 [s_kv, h_kv, 576],
    indices int32 [s_q, h_kv, topk] (negative or >= s_kv unused), attn_sink float32 [h_q] or None,
    topk_length int32 [s_q] or None. Returns ``(out bf16 [s_q, h_q, d_v], max_logits float32 [s_q, h_q],
    lse float32 [s_q, h_q])`` following :func:`hal.ops.mla_v2_reference.mla_sparse_prefill_reference`."""


@hookspec(firstresult=True)
def hal_quantize_mla_kv_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """Quantise an MLA cache to FlashMLA's 656-byte FP8 records (:mod:`hal.ops.mla_fp8_cache`).

    Args:
        k_cache: bf16/fp16/fp32 [num_blocks, page_block_size, 1, 576], any strides.

    Returns:
        float8_e4m3fn [num_blocks, page_block_size, 1, 656], contiguous, bit-identical to
        :func:`hal.ops.mla_fp8_cache.quantize_mla_kv_cache_reference`.
    """


# --- BF16 GEMMs (DeepGEMM) -----------------------------------------------------------------


@hookspec(firstresult=True)
def hal_gemm_bf16_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b.T``: a bf16 [M, K], b bf16 [N, K], both contiguous, K a multiple of 128
    (zero-padded); out bf16 or float32 [M, N], contiguous, written in place; exact products summed
    in fp32, rounded once (:func:`hal.ops.gemm_bf16.gemm_bf16_reference`)."""


@hookspec(firstresult=True)
def hal_m_grouped_gemm_bf16_nt_contiguous(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """MoE grouped bf16: a [M, K], b [G, N, K], out bf16 [M, N]; row r uses group m_indices[r]
    (int32, -1 = padding: not written; read only); segments aligned to the current contiguous alignment."""


@hookspec(firstresult=True)
def hal_m_grouped_gemm_bf16_nt_masked(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int
) -> None:
    """MoE masked bf16: a [G, M_max, K], b [G, N, K], out bf16 [G, M_max, N]; the first masked_m[g]
    rows of each group are computed, the others left untouched."""


# --- Indexer logits (DeepGEMM, DeepSeek-V3.2) ----------------------------------------------


@hookspec(firstresult=True)
def hal_mqa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scales: torch.Tensor,
    weights: torch.Tensor,
    k_start: torch.Tensor,
    k_end: torch.Tensor,
    clean_logits: bool,
    max_seqlen_k: int,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """Indexer logits for a prefill chunk (see :mod:`hal.ops.indexer`).

    Args:
        q: float8_e4m3fn [seq_len, H, D] contiguous; k: float8_e4m3fn [seq_len_kv, D] contiguous;
        k_scales: float32 [seq_len_kv]; weights: float32 (or bf16) [seq_len, H];
        k_start / k_end: int32 [seq_len] in [0, seq_len_kv]: row i sees keys [start, end).
        clean_logits: -inf at keys outside a row's range (else unspecified there).
        max_seqlen_k: 0, or the width of the compressed output (column j = key start + j).
        logits_dtype: float32 or bfloat16.

    Returns:
        logits [seq_len, seq_len_kv or max_seqlen_k] following
        :func:`hal.ops.indexer_reference.mqa_logits_reference`.
    """


@hookspec(firstresult=True)
def hal_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    clean_logits: bool,
    logits_dtype: torch.dtype,
) -> torch.Tensor:
    """Indexer logits over the paged FP8 key cache (see :mod:`hal.ops.indexer`).

    Args:
        q: float8_e4m3fn [batch, next_n, H, D] contiguous.
        kv_cache: uint8 [num_blocks, block_kv, 1, D + 4], each block ``block_kv * D`` e4m3 bytes
            then ``block_kv`` fp32 scales (blocks may be strided; each is contiguous).
        weights: float32 (or bf16) [batch * next_n, H]; block_table: int32 [batch, max_blocks].
        context_lens: int32 [batch, next_n] (row j sees p < len[b, j]) or [batch] (p <= len - next_n + j).
        max_context_len: output width; clean_logits: -inf at unseen positions; logits_dtype: float32 or bfloat16.

    Returns:
        logits [batch * next_n, max_context_len] following
        :func:`hal.ops.indexer_reference.paged_mqa_logits_reference`.
    """


# --- FP8 GEMM (DeepGEMM) -------------------------------------------------------------------


@hookspec(firstresult=True)
def hal_gemm_fp8_nt(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor
) -> None:
    """``out = (a * a_scales) @ (b * b_scales).T`` with fp32 accumulation, written in place.

    Args:
        a: float8_e4m3fn [M, K], contiguous (K-major); K % 128 == 0.
        a_scales: float32 [M, K // 128], any strides (DeepGEMM's column-major TMA layout included).
        b: float8_e4m3fn [N, K], contiguous (K-major).
        b_scales: float32 [ceil(N / 128), K // 128], one scale per 128x128 block.
        out: bfloat16 [M, N], contiguous; every element is overwritten.
    """


@hookspec(firstresult=True)
def hal_m_grouped_gemm_fp8_nt_contiguous(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out: torch.Tensor,
    m_indices: torch.Tensor,
) -> None:
    """MoE grouped GEMM, rows of ``a`` grouped contiguously by expert.

    Args:
        a: float8_e4m3fn [M, K]; a_scales float32 [M, K // 128].
        b: float8_e4m3fn [G, N, K]; b_scales float32 [G, ceil(N / 128), K // 128].
        out: bfloat16 [M, N].
        m_indices: int32 [M], the group of each row in [0, G), or -1 for rows not computed
            (a backend may skip them). The public call hands over
            :func:`hal.ops.gemm.rows_by_block` of the user's indices: -1 padding rows inside a
            group's aligned block arrive as that group's rows (DeepGEMM computes whole tiles).
            Read only: the public call may hand the same mapping to later calls.
    """


@hookspec(firstresult=True)
def hal_m_grouped_gemm_fp8_nt_masked(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
) -> None:
    """MoE grouped GEMM with a per-group row count (decode layout).

    Args:
        a: float8_e4m3fn [G, M_max, K]; a_scales float32 [G, M_max, K // 128].
        b: float8_e4m3fn [G, N, K]; b_scales float32 [G, ceil(N / 128), K // 128].
        out: bfloat16 [G, M_max, N]; rows at or beyond ``masked_m[g]`` must be left untouched.
        masked_m: int32 [G], rows to compute per group, each <= M_max.
        expected_m: a tuning hint (typical masked_m), never a bound.
    """


@hookspec(firstresult=True)
def hal_per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations: x [M, K] (K % 128 == 0) -> (float8_e4m3fn [M, K], float32 [M, K // 128])."""


@hookspec(firstresult=True)
def hal_per_block_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise weights: x [N, K] -> (float8_e4m3fn [N, K], float32 [ceil(N/128), ceil(K/128)])."""


# --- Expert parallelism (DeepEP) -----------------------------------------------------------


@hookspec(firstresult=True)
def hal_ep_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where each token goes: see :func:`hal.ops.ep.get_dispatch_layout` for the full contract.

    Args:
        topk_idx: int64 [num_tokens, num_topk], expert ids in [0, num_experts) or -1.
        num_experts: divisible by num_ranks.
        num_ranks: size of the expert-parallel group.

    Returns:
        ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R // 8] or None when
        R <= 8, num_tokens_per_expert int32 [E], is_token_in_rank bool [num_tokens, R])``.
    """


# --- Expert parallelism across processes (hal.ep): local kernels and the transport ----------


@hookspec(firstresult=True)
def hal_ep_pack(rows: torch.Tensor, bucket_idx: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy rows into bucket-major order: see :func:`hal.ops.ep_local.ep_pack`.

    Args:
        rows: [num_rows, width], any dtype, copied bitwise.
        bucket_idx: int64 [num_rows, num_slots], bucket ids in [0, num_buckets) or -1.
        num_buckets: B >= 1.

    Returns:
        ``(packed [S, width] dtype of rows, src_idx int32 [S], num_rows_per_bucket int32 [B])``;
        packed rows are ordered by bucket, then source row, then slot.
    """


@hookspec(firstresult=True)
def hal_ep_unpack(rows: torch.Tensor, bucket_of_row: torch.Tensor, num_buckets: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup rows into fixed slots per bucket: see :func:`hal.ops.ep_local.ep_unpack`.

    Args:
        rows: [S, width], any dtype, copied bitwise.
        bucket_of_row: int32 [S] in [0, num_buckets), at most num_slots rows per bucket.
        num_buckets, num_slots: the output's first two dimensions.

    Returns:
        ``(slots [num_buckets, num_slots, width] dtype of rows, num_rows_per_bucket int32 [B])``;
        each bucket's rows keep their order, unused slots are zero.
    """


@hookspec(firstresult=True)
def hal_ep_combine_reduce(
    rows: torch.Tensor | tuple[torch.Tensor, ...], src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """Sum rows into their tokens: see :func:`hal.ops.ep_local.ep_combine_reduce`.

    Args:
        rows: [S, width] bf16/fp16/fp32. A backend declaring the ``row_segments`` feature (contract
            version 2) may instead receive a tuple of [S_i, width] tensors of one dtype and
            width, standing for their concatenation in order (S = their rows together); each
            segment may be a view with any row stride.
        src_idx: int32 [S] in [0, num_tokens).
        num_tokens: N.
        weights: float32 [S] or None.

    Returns:
        [N, width] dtype of rows: ``sum w[s] * rows[s]`` per token accumulated in float32, zero for
        tokens without rows.
    """


@hookspec(firstresult=True)
def hal_ep_transport(group: object, device: torch.device, options: dict) -> object | None:
    """Optional, and not a dispatched operator: a whole dispatch/combine implementation for a group.

    ``hal.ep.Buffer(group)`` asks every available backend that implements this hook and accepts
    ``device.type``, highest priority first; the first non-None answer carries all of the
    Buffer's communication (e.g. DeepEP's own kernels when ``deep_ep`` is importable). When none
    answers, or ``HAL_EP_TRANSPORT=torch``, the default transport of :mod:`hal.ep` runs
    (torch.distributed collectives around ``hal_ep_pack``/``hal_ep_unpack``/``hal_ep_combine_reduce``).

    Args:
        group: the ``torch.distributed.ProcessGroup`` of the Buffer.
        device: the device the Buffer's tensors live on (``cuda:N`` for NCCL, ``cpu`` for gloo).
        options: the Buffer's keyword arguments: ``num_nvl_bytes``, ``num_rdma_bytes``,
            ``low_latency_mode``, ``timeout_s``.

    Returns:
        None to decline, or an object satisfying :class:`hal.ep.transport.Transport` (methods
        ``dispatch``, ``combine``, ``low_latency_dispatch``, ``low_latency_combine`` with
        DeepEP's signatures and return tuples).
    """
