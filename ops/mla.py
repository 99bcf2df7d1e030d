"""MLA decode over a paged KV cache (FlashMLA semantics): the contract, its checks, the entry points.

Shapes (FlashMLA, DeepSeek-V2/V3):

- ``q``: [batch, s_q, h_q, d], bf16 or fp16, d = 576 = 512 latent ("nope") + 64 rope channels.
  The last dimension must be contiguous.
- ``k_cache``: [num_blocks, 64, h_kv, d], dtype of q, last dimension contiguous. Pages hold 64
  tokens; V is the first ``head_dim_v`` = 512 channels of the same cache (MLA absorbs the value
  projection). h_q must be a multiple of h_kv (1 in DeepSeek's models).
- ``block_table``: int32 [batch, max_blocks_per_seq]. Token t of sequence b lives at
  ``k_cache[block_table[b, t // 64], t % 64]``; entries past a sequence's last page are ignored.
- ``cache_seqlens``: int32 [batch], 0 <= seqlen <= max_blocks_per_seq * 64.
- Results: ``out`` [batch, s_q, h_q, 512] dtype of q; ``lse`` float32 [batch, h_q, s_q] (note
  the transposed order), natural-log log-sum-exp of the scaled scores.
- ``causal`` with s_q > 1 (multi-token prediction): query i sees keys ``0 .. seqlen - s_q + i``.
  With s_q == 1 causal has no effect.

FlashMLA's DeepSeek-V3.2 arguments (FP8 KV cache, sparse indices, attention sinks, a second
cache) and its schedule object are described in :mod:`hal.ops.mla_v2`.
"""

from __future__ import annotations

import torch

from hal.checks import (
    expect_in_range, expect_int, expect_rows_in_range, expect_same_device, expect_tensor, positive_finite, small_pages_within,
    value_checks_enabled, values_within,
)
from hal.dispatch import call
from hal.errors import ArgumentError, DTypeError, LayoutError, ShapeError, ValueRangeError
from hal.layouts import Layouts
from hal.operator import declare
from hal.ops.mla_schedule import BLOCK_SIZE_N, METADATA_WIDTH, schedule_mla_splits
from hal.ops.mla_fp8_cache import MODEL1_DIM
from hal.ops.mla_v2 import NO_LAYOUT, Layout, MLASchedule, decode_v2, layout_of
from hal.selection import select

__all__ = ["MLA_DECODE", "MLASchedule", "HEAD_DIM_QK", "HEAD_DIM_V", "PAGE_BLOCK_SIZE", "get_mla_metadata", "flash_mla_with_kvcache", "validate_mla_decode"]

HEAD_DIM_QK = 576
HEAD_DIM_V = 512
PAGE_BLOCK_SIZE = BLOCK_SIZE_N
MLA_DTYPES = (torch.bfloat16, torch.float16)

MLA_DECODE = declare("mla_decode", "hal_mla_decode", "mla", "MLA decode over a paged KV cache (flash_mla_with_kvcache)")

_OP = "flash_mla_with_kvcache"
_META_OP = "get_mla_metadata"


def get_mla_metadata(
    cache_seqlens: torch.Tensor | None = None, num_q_tokens_per_head_k: int | None = None, num_heads_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | tuple[MLASchedule, None]:
    """Split-KV schedule for :func:`flash_mla_with_kvcache`, in either of FlashMLA's two forms.

    With no arguments (FlashMLA's current form): ``(MLASchedule(), None)``, filled on first use.

    Args:
        cache_seqlens: int32 [batch].
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``.
        num_heads_k: ``h_kv``.

    Returns:
        ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [batch + 1])`` on the
        device of ``cache_seqlens``. Comes from the backend selected for ``mla_decode`` when it
        has its own scheduler, else from :func:`hal.ops.mla_schedule.schedule_mla_splits`.
    """
    if cache_seqlens is None and num_q_tokens_per_head_k is None and num_heads_k is None:
        return MLASchedule(), None
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    expect_tensor(_META_OP, "cache_seqlens", cache_seqlens, dtypes=torch.int32, shape=(None,), dims=("batch",))
    expect_in_range(
        _META_OP, "cache_seqlens", cache_seqlens, 0, 2**31 - 1, what="sequence lengths in tokens",
        fix="A length is the number of cached keys of a sequence: 0 or more.",
    )
    expect_int(_META_OP, "num_q_tokens_per_head_k", num_q_tokens_per_head_k, minimum=1)
    expect_int(_META_OP, "num_heads_k", num_heads_k, minimum=1)
    backend = select(MLA_DECODE, cache_seqlens.device.type, device_arg="cache_seqlens").backend
    scheduler = backend.impl("hal_get_mla_metadata")
    if scheduler is None:
        return schedule_mla_splits(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    return scheduler(
        cache_seqlens=cache_seqlens, num_q_tokens_per_head_k=num_q_tokens_per_head_k, num_heads_k=num_heads_k
    )


def validate_mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
) -> tuple[float, bool]:
    """Check every argument of :func:`flash_mla_with_kvcache`; return the resolved (scale, causal).

    The structural checks run once per argument layout (:class:`hal.layouts.Layouts`); the block
    table's and lengths' contents on every call (per :func:`hal.checks.value_checks_enabled`)."""
    values = (q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale)
    key, known = _DECODE_LAYOUTS.lookup(values)
    if known is None:
        _check_decode_layouts(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale)
        _DECODE_LAYOUTS.remember(values, key)
    if value_checks_enabled(cache_seqlens):
        _check_cache_contents(block_table, cache_seqlens, k_cache.shape[0])
    return _resolve_scale(softmax_scale), bool(causal) and q.shape[1] > 1


_DECODE_LAYOUTS = Layouts()  # argument layouts that passed _check_decode_layouts


def _check_decode_layouts(
    q: object, k_cache: object, block_table: object, cache_seqlens: object, head_dim_v: object, tile_scheduler_metadata: object,
    num_splits: object, softmax_scale: object,
) -> None:
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype == torch.float8_e4m3fn:
        raise DTypeError(
            _OP, "k_cache", "dtype bfloat16 or float16 (dtype of q)", "dtype float8_e4m3fn",
            "For the 656-byte FP8 cache pass is_fp8_kvcache=True (with a schedule from get_mla_metadata()).",
        )
    _check_query(q)
    batch, s_q = q.shape[:2]
    expect_tensor(
        _OP, "k_cache", k_cache, dtypes=q.dtype, shape=(None, PAGE_BLOCK_SIZE, None, HEAD_DIM_QK),
        dims=("num_blocks", "page_block_size", "h_kv", "d"),
    )
    _expect_last_dim_contiguous("k_cache", k_cache)
    expect_int(_OP, "head_dim_v", head_dim_v, allowed=(HEAD_DIM_V,))
    expect_tensor(
        _OP, "tile_scheduler_metadata", tile_scheduler_metadata, dtypes=torch.int32, shape=(None, METADATA_WIDTH),
        dims=("num_sm_parts", "8"),
    )
    expect_tensor(_OP, "num_splits", num_splits, dtypes=torch.int32, shape=(batch + 1,), dims=("batch+1",))
    expect_same_device(_OP, "q", q, k_cache=k_cache, tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits)
    _resolve_scale(softmax_scale)
    _check_paging(q, k_cache.shape[2], block_table, cache_seqlens)


def _expect_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() and tensor.stride(-1) != 1:
        raise LayoutError(_OP, name, "a contiguous last dimension (stride 1)", f"stride {tensor.stride(-1)}", f"Pass '{name}.contiguous()'.")


def _check_query(q: object, width: int = HEAD_DIM_QK) -> None:
    expect_tensor(_OP, "q", q, dtypes=MLA_DTYPES, shape=(None, None, None, width), dims=("batch", "s_q", "h_q", "d"))
    _expect_last_dim_contiguous("q", q)


def _check_paging(q: torch.Tensor, h_kv: int, block_table: object, cache_seqlens: object) -> None:
    """The dense mode's paging: KV heads dividing the query heads, the block table and lengths and
    their device (their contents: :func:`_check_cache_contents`)."""
    batch, _, h_q, _ = q.shape
    if h_kv < 1 or h_q % h_kv != 0:
        raise ShapeError(_OP, "k_cache", f"h_kv dividing h_q={h_q}", f"h_kv={h_kv}", "MLA uses one KV head (h_kv=1).")
    expect_tensor(_OP, "block_table", block_table, dtypes=torch.int32, shape=(batch, None), dims=("batch", "max_blocks_per_seq"))
    expect_tensor(_OP, "cache_seqlens", cache_seqlens, dtypes=torch.int32, shape=(batch,), dims=("batch",))
    expect_same_device(_OP, "q", q, block_table=block_table, cache_seqlens=cache_seqlens)


def _check_cache_contents(block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int) -> None:
    capacity = block_table.shape[1] * PAGE_BLOCK_SIZE
    if small_pages_within(block_table, cache_seqlens, capacity, num_blocks, PAGE_BLOCK_SIZE):
        return  # a small batch, all in range; else the checks below name what is not
    # Any length from 0 is valid, causal or not: a causal query that sees no key (a sequence shorter
    # than s_q, or the zero-length slots engines pad CUDA-graph batches with) gets out 0, lse +inf.
    if not values_within(cache_seqlens, 0, capacity + 1):
        expect_in_range(
            _OP, "cache_seqlens", cache_seqlens, 0, capacity + 1,
            what=f"sequence lengths in tokens (at most the block table's capacity {block_table.shape[1]} pages x {PAGE_BLOCK_SIZE})",
            fix=f"Lengths must be >= 0; a sequence longer than {capacity} tokens needs more block_table columns.",
        )

    expect_rows_in_range(
        _OP, "block_table", block_table, cache_seqlens, 0, num_blocks, per_entry=PAGE_BLOCK_SIZE,
        what=f"block ids of used pages (k_cache has {num_blocks} blocks)",
        fix="Every page a sequence uses must index an existing k_cache block.",
    )


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | MLASchedule,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged KV cache (see the module docstring for the layouts).

    Args:
        q: [batch, s_q, h_q, 576] bf16/fp16.
        k_cache: [num_blocks, 64, h_kv, 576], dtype of q; or the FP8 cache with ``is_fp8_kvcache``.
        block_table: int32 [batch, max_blocks_per_seq] (None allowed with ``indices``).
        cache_seqlens: int32 [batch] (None allowed with ``indices``).
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: from :func:`get_mla_metadata`: its tensors (v1), or
            an :class:`MLASchedule` and ``num_splits=None`` (current form).
        softmax_scale: default ``d_qk ** -0.5`` (``q.shape[-1]``: 576, or 512 with the MODEL1 cache).
        causal: causal mask among the s_q query tokens (dense mode only).
        is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
            extra_topk_length: FlashMLA's DeepSeek-V3.2 arguments, see :mod:`hal.ops.mla_v2`.

    Returns:
        ``(out [batch, s_q, h_q, 512] dtype of q, lse float32 [batch, h_q, s_q])``.
    """
    extended = is_fp8_kvcache or not (  # a chain of `is None`: a generator over them costs a microsecond a call
        indices is None and attn_sink is None and extra_k_cache is None and extra_indices_in_kvcache is None
        and topk_length is None and extra_topk_length is None
    )
    if extended and torch.compiler.is_compiling():  # one opaque node; the V3.2 path needs no schedule
        return torch.ops.hal.mla_decode_v2(
            q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
            extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length,
        )
    layout = layout_of(q, k_cache, block_table, cache_seqlens, head_dim_v, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                       extra_indices_in_kvcache, topk_length, extra_topk_length) if extended else NO_LAYOUT
    if isinstance(tile_scheduler_metadata, MLASchedule):
        if num_splits is not None:
            raise ArgumentError(_OP, "num_splits", "None with a schedule from get_mla_metadata()", "a value", "Pass num_splits=None.")
        _bind(tile_scheduler_metadata, layout.key, q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices_in_kvcache)
        if not extended:
            schedule = tile_scheduler_metadata
            if schedule.tile_scheduler_metadata is None:  # the dense schedule, computed on first use
                expect_tensor(_OP, "q", q, dtypes=MLA_DTYPES, shape=(None, None, None, HEAD_DIM_QK), dims=("batch", "s_q", "h_q", "d"))
                expect_tensor(_OP, "k_cache", k_cache, shape=(None, None, None, HEAD_DIM_QK), dims=("num_blocks", "page_block_size", "h_kv", "d"))
                h_kv = max(k_cache.shape[2], 1)
                schedule.tile_scheduler_metadata, schedule.num_splits = get_mla_metadata(cache_seqlens, max(q.shape[1] * q.shape[2] // h_kv, 1), h_kv)
            tile_scheduler_metadata, num_splits = schedule.tile_scheduler_metadata, schedule.num_splits
    if extended:
        return _decode_v2(
            q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
            extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length, layout,
        )
    if torch.compiler.is_compiling():
        return torch.ops.hal.mla_decode(
            q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
        )
    scale, causal = validate_mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal
    )
    return call(
        MLA_DECODE, "q", q.device,
        q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens, head_dim_v=head_dim_v,
        tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, softmax_scale=scale, causal=causal,
    )


def _resolve_scale(softmax_scale: float | None, d_qk: int = HEAD_DIM_QK) -> float:
    if softmax_scale is None:
        return d_qk**-0.5
    if not positive_finite(softmax_scale):  # any real number (a NumPy float32 included, as FlashMLA's binding takes it), never a bool
        raise ValueRangeError(_OP, "softmax_scale", "a positive finite float or None", repr(softmax_scale), "Omit it for the default d ** -0.5.")
    return float(softmax_scale)


def _bind(
    schedule: MLASchedule, key: tuple | None, q: object, k_cache: object, causal: object, is_fp8_kvcache: object, indices: object,
    extra_k_cache: object, extra_indices: object,
) -> None:
    """:meth:`MLASchedule.bind` with this call's configuration (arguments not yet checked).

    ``key``: the V3.2 call's layout key (:func:`hal.ops.mla_v2.layout_of`; None for the dense form). Every
    value bind() compares is a function of it (shapes; causal and the FP8 flag as Python scalars,
    layout_of giving no key for any other kind), so a layout bound before needs no second look."""
    if key is not None and schedule._extra.get("layout") == key:
        return
    def sizes(value: object, fewest: int, most: int = 8) -> tuple | None:  # None where no shape can be read (nested, 0-d): the checks name it
        return value.shape if isinstance(value, torch.Tensor) and not value.is_nested and fewest <= value.dim() <= most else None

    q_shape, k_shape = sizes(q, 4, 4) or (None,) * 4, sizes(k_cache, 4, 4) or (None,) * 4
    topk, extra_page, extra_topk = sizes(indices, 1), sizes(extra_k_cache, 2), sizes(extra_indices, 1)
    schedule.bind(  # MLASchedule.Config's fields, in order
        q_shape[0], q_shape[1], q_shape[2], k_shape[1], k_shape[2], bool(causal), bool(is_fp8_kvcache),
        topk[-1] if topk is not None else None, extra_page[1] if extra_page is not None else None, extra_topk[-1] if extra_topk is not None else None,
    )
    if key is not None:
        schedule._extra["layout"] = key


def _decode_v2(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
    extra_k_cache, extra_indices, topk_length, extra_topk_length, layout: Layout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The V3.2 arguments: common checks here, the rest in :func:`hal.ops.mla_v2.decode_v2`.

    q is 576 wide, or 512 wide with the MODEL1 FP8 cache in the sparse mode (FlashMLA's d_qk 512).
    ``layout``: :func:`hal.ops.mla_v2.layout_of` of the arguments."""
    if layout.features is None:
        model1 = isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] == MODEL1_DIM and is_fp8_kvcache and indices is not None
        _check_query(q, MODEL1_DIM if model1 else HEAD_DIM_QK)
        expect_int(_OP, "head_dim_v", head_dim_v, allowed=(HEAD_DIM_V,))
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    causal = bool(causal) and q.shape[1] > 1

    def dense_layout(cache: torch.Tensor) -> None:
        if cache.shape[1] != PAGE_BLOCK_SIZE:
            raise ShapeError(_OP, "k_cache", f"page_block_size {PAGE_BLOCK_SIZE} in the dense mode", f"{cache.shape[1]}", "Use 64-token pages.")
        _check_paging(q, cache.shape[2], block_table, cache_seqlens)

    def dense_contents(cache: torch.Tensor) -> None:
        if value_checks_enabled(cache_seqlens):
            _check_cache_contents(block_table, cache_seqlens, cache.shape[0])

    return decode_v2(
        q, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal, bool(is_fp8_kvcache), indices, attn_sink,
        extra_k_cache, extra_indices, topk_length, extra_topk_length, dense_layout, dense_contents, layout,
    )
