"""FlashMLA's current API (DeepSeek-V3.2): the schedule object, the V3.2 decode arguments, sparse prefill.

``flash_mla_with_kvcache`` (in :mod:`hal.ops.mla`) keeps its v1 form and adds, after ``causal``:

- ``is_fp8_kvcache``: ``k_cache`` is the 656-byte FP8 layout of :mod:`hal.ops.mla_fp8_cache`.
- ``indices`` int32 [batch, s_q, topk]: sparse decode. Each entry is a position in the flattened
  cache, ``block_id * page_block_size + slot``; -1 = unused. ``block_table`` and
  ``cache_seqlens`` may be None; ``causal`` must be False. h_kv must be 1.
- ``topk_length`` int32 [batch]: only the first ``topk_length[b]`` indices of batch b count.
- ``attn_sink`` float32 [h_q]: out scaled by ``1 / (1 + exp(sink - lse))``; lse unchanged.
- ``extra_k_cache`` / ``extra_indices_in_kvcache`` / ``extra_topk_length``: a second cache
  attended in the same softmax (same format as ``k_cache``; sparse mode only).

Numerics: :mod:`hal.ops.mla_v2_reference`. Calls that use none of these arguments run the v1
operator ``mla_decode``; the others run ``mla_decode_v2`` (a backend may implement either).
``get_mla_metadata()`` with no arguments returns ``(MLASchedule(), None)``: the schedule is
computed on first use and checked against later calls, as FlashMLA's ``FlashMLASchedMeta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

from hal.checks import expect_in_range, expect_int, expect_same_device, expect_tensor, first_outside, first_outside_fixed, positive_finite, values_within
from hal.compiled_checks import FixedRanges, fixed_ranges
from hal.dispatch import call
from hal.errors import ArgumentError, DTypeError, ShapeError, ValueRangeError
from hal.layouts import Layouts
from hal.operator import Feature, declare
from hal.ops.mla_fp8_cache import MODEL1_DIM, check_fp8_kv_cache, check_model1_kv_cache

__all__ = ["MLA_DECODE_V2", "MLA_SPARSE_PREFILL", "MLASchedule", "Layout", "NO_LAYOUT", "layout_of", "decode_v2", "flash_mla_sparse_fwd", "dense_window_indices"]

MLA_DECODE_V2 = declare(
    "mla_decode_v2", "hal_mla_decode_v2", "mla", "MLA decode with FP8 KV cache, sparse indices, attention sink (FlashMLA, DeepSeek-V3.2)",
    version=2,
    features=(
        Feature("dense", "the dense mode (block_table + cache_seqlens) with V3.2 arguments"),
        Feature("sparse", "sparse attention over top-k indices into the flattened cache"),
        Feature("fp8_kv", "the 656-byte FP8 KV cache (is_fp8_kvcache=True)"),
        Feature("sink", "attention sinks (attn_sink)"),
        Feature("topk_length", "per-batch cuts of the index lists (topk_length)"),
        Feature("extra_cache", "a second cache in the same softmax (extra_k_cache)"),
        Feature("model1_fp8", "512-wide queries over FlashMLA's MODEL1_FP8Sparse cache (448 e4m3 + 64 bf16 per token, V the whole key)", since=2),
    ),
)
MLA_SPARSE_PREFILL = declare(
    "mla_sparse_prefill", "hal_mla_sparse_prefill", "mla", "Sparse MLA prefill over top-k indices (flash_mla_sparse_fwd)",
    version=2,
    features=(
        Feature("sink", "attention sinks (attn_sink)"),
        Feature("topk_length", "per-token cuts of the index lists (topk_length)"),
        Feature("d_qk_512", "512-wide queries and keys (FlashMLA's d_qk = 512 models: V is the whole key)", since=2),
    ),
)

_OP = "flash_mla_with_kvcache"
_PREFILL_OP = "flash_mla_sparse_fwd"
HEAD_DIM_QK = 576
HEAD_DIM_V = 512
PREFILL_HEAD_DIMS = (HEAD_DIM_V, HEAD_DIM_QK)  # FlashMLA's prefill tests run d_qk 512 and 576
Q_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class MLASchedule:
    """What ``get_mla_metadata()`` returns (FlashMLA's ``FlashMLASchedMeta``).

    Filled on the first :func:`hal.flash_mla_with_kvcache` call that uses it (``config`` records
    that call's shapes and mode, as FlashMLA's does); later calls must keep them (a typed error says
    which differs). Reuse it only while ``cache_seqlens`` / ``topk_length`` values stay the same,
    as FlashMLA requires.
    """

    @dataclass
    class Config:
        """FlashMLA's ``FlashMLASchedMeta.Config``: the first call's shapes and mode."""

        b: int | None
        s_q: int | None
        h_q: int | None
        page_block_size: int | None
        h_k: int | None
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def bind(self, *values: Any) -> None:
        """Record the first call's configuration (``values``: :class:`Config`'s fields in order), or
        check a later call's against it. Per call this compares one tuple: building a Config costs
        more than the comparison, so one is built only on the first call or on a mismatch."""
        if not self.have_initialized:
            self.have_initialized, self.config = True, MLASchedule.Config(*values)
            self._extra["bound"] = (self.config, values)
            return
        bound = self._extra.get("bound")
        if bound is not None and bound[0] is self.config and bound[1] == values:  # the config it was made from, unchanged
            return
        config = MLASchedule.Config(*values)
        for item in fields(config):
            first, now = getattr(self.config, item.name), getattr(config, item.name)
            if first != now:
                raise ArgumentError(
                    _OP, "tile_scheduler_metadata", f"a schedule used with {item.name}={first!r} (its first call)",
                    f"a call with {item.name}={now!r}", "Call get_mla_metadata() again for a batch of another shape or mode.",
                )


def _check_cache(name: str, cache: object, q: torch.Tensor, fp8: bool) -> torch.Tensor:
    if fp8 and q.shape[-1] == MODEL1_DIM:  # validated with the sparse mode by the caller
        return check_model1_kv_cache(_OP, name, cache)
    if fp8:
        return check_fp8_kv_cache(_OP, name, cache)
    if isinstance(cache, torch.Tensor) and cache.dtype == torch.float8_e4m3fn:
        raise DTypeError(_OP, name, f"dtype {q.dtype} (the dtype of q)", "an FP8 cache", "Pass is_fp8_kvcache=True for the 656-byte FP8 layout.")
    return expect_tensor(_OP, name, cache, dtypes=q.dtype, shape=(None, None, None, HEAD_DIM_QK), dims=("num_blocks", "page_block_size", "h_kv", "d"))


def _check_indices(name: str, indices: object, batch: int, s_q: int) -> torch.Tensor:
    return expect_tensor(_OP, name, indices, dtypes=torch.int32, shape=(batch, s_q, None), dims=("batch", "s_q", "topk"))


def _check_indices_contents(name: str, indices: torch.Tensor, cache: torch.Tensor) -> None:
    positions = cache.shape[0] * cache.shape[1]
    if not values_within(indices, -1, positions):
        expect_in_range(
            _OP, name, indices, -1, positions, what=f"positions block_id * page_block_size + slot in [0, {positions}) or -1 for unused",
            fix="Index the flattened cache; mark unused entries -1.",
        )


def _check_length(name: str, length: object, batch: int) -> None:
    if length is not None:
        expect_tensor(_OP, name, length, dtypes=torch.int32, shape=(batch,), dims=("batch",))


def _check_length_contents(name: str, length: torch.Tensor | None, topk: int) -> None:
    if length is not None and not values_within(length, 0, topk + 1):
        expect_in_range(_OP, name, length, 0, topk + 1, what=f"lengths in [0, topk={topk}]", fix="Cut each batch's list at most at its topk.")


def _check_sink(name: str, sink: object, h_q: int) -> None:
    if sink is not None:
        expect_tensor(_OP, name, sink, dtypes=torch.float32, shape=(h_q,), dims=("h_q",))


# Argument layouts that passed _check_layouts_v2, with the features they ask of a backend.
_LAYOUTS = Layouts()


def _check_layouts_v2(
    q: torch.Tensor, k_cache: object, block_table: object, cache_seqlens: object, causal: bool, is_fp8_kvcache: bool, indices: object,
    attn_sink: object, extra_k_cache: object, extra_indices: object, topk_length: object, extra_topk_length: object, dense_layout: Any,
) -> frozenset[str]:
    """Everything but the contents; returns the features the call asks of a backend."""
    batch, s_q, h_q, _ = q.shape
    cache = _check_cache("k_cache", k_cache, q, is_fp8_kvcache)
    _check_sink("attn_sink", attn_sink, h_q)
    if indices is None:
        for name, value in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices), ("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
            if value is not None:
                raise ArgumentError(_OP, name, "None in the dense mode (indices=None)", "a value", "Pass indices for sparse attention, or drop this argument.")
        dense_layout(cache)
    else:
        if causal:
            raise ValueRangeError(_OP, "causal", "False with sparse indices (the indices choose the keys)", "True", "Pass causal=False.")
        if cache.shape[2] != 1:
            raise ShapeError(_OP, "k_cache", "h_kv = 1 in the sparse mode", f"h_kv = {cache.shape[2]}", "Sparse MLA uses one latent KV head.")
        _check_indices("indices", indices, batch, s_q)
        _check_length("topk_length", topk_length, batch)
        if (extra_k_cache is None) != (extra_indices is None):
            missing = "extra_indices_in_kvcache" if extra_indices is None else "extra_k_cache"
            raise ArgumentError(_OP, missing, "given together with its pair", "None", "Pass both extra_k_cache and extra_indices_in_kvcache, or neither.")
        if extra_k_cache is not None:
            extra = _check_cache("extra_k_cache", extra_k_cache, q, is_fp8_kvcache)
            if extra.shape[2] != 1:
                raise ShapeError(_OP, "extra_k_cache", "h_kv = 1 in the sparse mode", f"h_kv = {extra.shape[2]}", "Sparse MLA uses one latent KV head.")
            _check_indices("extra_indices_in_kvcache", extra_indices, batch, s_q)
            _check_length("extra_topk_length", extra_topk_length, batch)
        elif extra_topk_length is not None:
            raise ArgumentError(_OP, "extra_topk_length", "None without an extra cache", "a tensor", "Drop it, or pass extra_k_cache.")
    expect_same_device(
        _OP, "q", q, k_cache=k_cache, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices, topk_length=topk_length, extra_topk_length=extra_topk_length,
    )
    features = {"sparse" if indices is not None else "dense"}
    features |= {name for name, value in (("fp8_kv", is_fp8_kvcache), ("sink", attn_sink is not None), ("extra_cache", extra_k_cache is not None),
                 ("topk_length", topk_length is not None or extra_topk_length is not None), ("model1_fp8", q.shape[-1] == MODEL1_DIM)) if value}
    return frozenset(features)


_FLAGS = (bool, int)


class Layout(NamedTuple):
    """A V3.2 call's arguments as :class:`hal.layouts.Layouts` knows them (see :func:`layout_of`)."""

    values: tuple[Any, ...] | None  # the arguments a layout is told by; None: checked every call
    key: tuple[Any, ...] | None  # their :func:`hal.checks.signature`
    features: frozenset[str] | None  # what the layout asks of a backend, when it passed every check before
    ranges: FixedRanges | None = None  # the sparse mode's index checks with the bounds this layout fixes (see _index_ranges)


NO_LAYOUT = Layout(None, None, None)


def _room(cache: object) -> object:
    """What a MODEL1 cache's layout check reads beyond its signature: the room its storage has from
    its first element on (whether its last page ends within it follows from that and the shape and
    strides, which the signature holds; 0.13 us where reading the verdict itself costs 0.5). None
    for anything but a plain strided 4-d tensor, which the checks then name."""
    if type(cache) is not torch.Tensor or cache.layout is not torch.strided or cache.dim() != 4:  # a sparse tensor has no storage to ask
        return None
    return cache.untyped_storage().nbytes() - cache.storage_offset() * cache.itemsize


def layout_of(
    q: object, k_cache: object, block_table: object, cache_seqlens: object, head_dim_v: object, causal: object, is_fp8_kvcache: object,
    indices: object, attn_sink: object, extra_k_cache: object, extra_indices: object, topk_length: object, extra_topk_length: object,
) -> Layout:
    """A V3.2 call's layout, looked up once: its signature, and its features when it passed every
    check before (q's and head_dim_v's included). No key where the layout checks must run every
    call: ``causal`` or ``is_fp8_kvcache`` given as anything but a bool or int (a signature keys a
    tensor by its layout, not its value), and anything a signature cannot describe. The MODEL1
    cache's check also reads where its pages lie in their storage, which no signature holds: its
    layout is told by the room the caches' storages have past their first elements too."""
    if type(causal) not in _FLAGS or type(is_fp8_kvcache) not in _FLAGS:  # a tensor flag: its value is no part of a signature
        return NO_LAYOUT
    values = (q, k_cache, block_table, cache_seqlens, head_dim_v, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices,
              topk_length, extra_topk_length)
    if is_fp8_kvcache and type(q) is torch.Tensor and q.dim() == 4 and q.shape[-1] == MODEL1_DIM:
        values += (_room(k_cache), _room(extra_k_cache))
    key, checked = _LAYOUTS.lookup(values)  # checked: (features, ranges) when the layout passed before
    if key is None:
        return NO_LAYOUT
    return Layout(values, key, *checked) if checked is not None else Layout(values, key, None)


def _index_ranges(
    k_cache: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None, extra_k_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None, extra_topk_length: torch.Tensor | None,
) -> list[tuple[torch.Tensor | None, int, int]]:
    """The sparse mode's index tensors (None where not given) with their ranges, which their
    layouts fix: indices within the cache's slots (-1 unused), lengths at most topk."""
    return [
        (indices, -1, k_cache.shape[0] * k_cache.shape[1]),
        (topk_length, 0, indices.shape[2] + 1),
        (extra_indices, -1, extra_k_cache.shape[0] * extra_k_cache.shape[1] if extra_k_cache is not None else 0),
        (extra_topk_length, 0, extra_indices.shape[2] + 1 if extra_indices is not None else 0),
    ]


def decode_v2(
    q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None, cache_seqlens: torch.Tensor | None, head_dim_v: int,
    softmax_scale: float, causal: bool, is_fp8_kvcache: bool, indices: torch.Tensor | None, attn_sink: torch.Tensor | None,
    extra_k_cache: torch.Tensor | None, extra_indices: torch.Tensor | None, topk_length: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None, dense_layout: Any, dense_contents: Any, layout: Layout = NO_LAYOUT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the V3.2 arguments (q, scale and head_dim_v already checked) and run ``mla_decode_v2``.

    ``dense_layout(cache)`` checks block_table / cache_seqlens for the dense mode, ``dense_contents(cache)``
    their contents. Layouts are checked once per signature (``layout``, from :func:`layout_of` on
    the caller's arguments: its features, when known, skip the layout checks), contents on every call.
    """
    features, ranges = layout.features, layout.ranges
    if features is None:
        features = _check_layouts_v2(q, k_cache, block_table, cache_seqlens, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                                     extra_indices, topk_length, extra_topk_length, dense_layout)
        if layout.key is not None:
            ranges = fixed_ranges(_index_ranges(k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length)) if indices is not None else None
            _LAYOUTS.remember(layout.values, layout.key, (features, ranges))
    if indices is None:
        dense_contents(k_cache)
    else:  # every index tensor in one check; the one that fails is then named
        found = first_outside_fixed(ranges, (indices, topk_length, extra_indices, extra_topk_length))
        if found is None:
            checks = _index_ranges(k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length)
            found = first_outside([check for check in checks if check[0] is not None])
        if found >= 0:
            _check_indices_contents("indices", indices, k_cache)
            _check_length_contents("topk_length", topk_length, indices.shape[2])
            if extra_k_cache is not None:
                _check_indices_contents("extra_indices_in_kvcache", extra_indices, extra_k_cache)
                _check_length_contents("extra_topk_length", extra_topk_length, extra_indices.shape[2])
    return call(
        MLA_DECODE_V2, "q", q.device, features=features,
        q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
        causal=causal, is_fp8_kvcache=is_fp8_kvcache, indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices=extra_indices, topk_length=topk_length, extra_topk_length=extra_topk_length,
    )


def flash_mla_sparse_fwd(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = HEAD_DIM_V,
    attn_sink: torch.Tensor | None = None, topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill (FlashMLA's ``flash_mla_sparse_fwd``).

    Args:
        q: bf16 [s_q, h_q, d_qk], d_qk 576 (512 NoPE + 64 RoPE, DeepSeek-V3.2) or 512 (V is then
            the whole key; feature ``d_qk_512``).
        kv: bf16 [s_kv, h_kv, d_qk]; h_q a multiple of h_kv.
        indices: int32 [s_q, h_kv, topk]: key positions in [0, s_kv); negative or >= s_kv = unused.
        sm_scale: the softmax scale (no default, as the anchor).
        d_v: 512.
        attn_sink: float32 [h_q] or None: out scaled by ``1 / (1 + exp(sink - lse))``.
        topk_length: int32 [s_q] or None: only the first ``topk_length[i]`` indices of token i count.

    Returns:
        ``(out bf16 [s_q, h_q, d_v], max_logits float32 [s_q, h_q], lse float32 [s_q, h_q])``; a
        row with no valid index: out 0, max_logits -inf, lse +inf.
    """
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    op = _PREFILL_OP
    values = (q, kv, indices, d_v, attn_sink, topk_length)
    features = _PREFILL_LAYOUTS.recall(values, _check_prefill_layouts, q, kv, indices, d_v, attn_sink, topk_length)
    if not positive_finite(sm_scale):
        raise ValueRangeError(op, "sm_scale", "a positive finite float", repr(sm_scale), "Pass d_qk ** -0.5 for the usual scale.")
    if topk_length is not None and not values_within(topk_length, 0, indices.shape[2] + 1):
        expect_in_range(op, "topk_length", topk_length, 0, indices.shape[2] + 1, what=f"lengths in [0, topk={indices.shape[2]}]",
                        fix="Cut each token's list at most at its topk.")
    return call(
        MLA_SPARSE_PREFILL, "q", q.device, features=features,
        q=q, kv=kv, indices=indices, sm_scale=float(sm_scale), d_v=d_v, attn_sink=attn_sink, topk_length=topk_length,
    )


def _check_prefill_layouts(q: object, kv: object, indices: object, d_v: object, attn_sink: object, topk_length: object) -> frozenset[str]:
    """flash_mla_sparse_fwd's structural checks (once per argument layout); returns the features
    the call asks of a backend."""
    op = _PREFILL_OP
    expect_tensor(op, "q", q, dtypes=torch.bfloat16, shape=(None, None, None), dims=("s_q", "h_q", "d_qk"))
    s_q, h_q, d_qk = q.shape
    if d_qk not in PREFILL_HEAD_DIMS:
        raise ShapeError(op, "q", "d_qk 576 (512 NoPE + 64 RoPE) or 512", f"d_qk {d_qk}", "Pass MLA's query head: 576 wide for DeepSeek-V3.2.")
    expect_tensor(op, "kv", kv, dtypes=torch.bfloat16, shape=(None, None, d_qk), dims=("s_kv", "h_kv", "d_qk"))
    h_kv = kv.shape[1]
    if h_kv == 0 or h_q % h_kv:
        raise ShapeError(op, "q", f"h_q a multiple of h_kv={h_kv}", f"h_q={h_q}", "Give every KV head the same number of query heads.")
    expect_tensor(op, "indices", indices, dtypes=torch.int32, shape=(s_q, h_kv, None), dims=("s_q", "h_kv", "topk"))
    expect_int(op, "d_v", d_v, allowed=(HEAD_DIM_V,))  # an int: 512.0 would reach the kernels as a float size
    if attn_sink is not None:
        expect_tensor(op, "attn_sink", attn_sink, dtypes=torch.float32, shape=(h_q,), dims=("h_q",))
    if topk_length is not None:
        expect_tensor(op, "topk_length", topk_length, dtypes=torch.int32, shape=(s_q,), dims=("s_q",))
    expect_same_device(op, "q", q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    return frozenset(name for name, value in (("sink", attn_sink is not None), ("topk_length", topk_length is not None), ("d_qk_512", d_qk == HEAD_DIM_V)) if value)


_PREFILL_LAYOUTS = Layouts()  # argument layouts that passed _check_prefill_layouts -> the call's features


def dense_window_indices(block_table: torch.Tensor, cache_seqlens: torch.Tensor, s_q: int, page: int, causal: bool) -> torch.Tensor:
    """The dense mode's keys as sparse index lists (how a backend can run the dense V3.2 mode on its
    sparse kernel), computed with tensor ops on the table's device (no host sync).

    Query token ``i`` of batch ``b`` sees positions ``p < seqlen[b]`` (causal: ``p < seqlen[b] - s_q + i + 1``);
    its list holds ``block_table[b, p // page] * page + p % page`` for those and -1 elsewhere, over
    the table's full width (a static shape, so CUDA graphs capture it). Returns int32 [batch, s_q, width * page].
    """
    batch, width = block_table.shape
    positions = torch.arange(width * page, device=block_table.device, dtype=torch.int32)
    flat = block_table.repeat_interleave(page, dim=1) * page + positions % page  # [batch, width * page]
    limit = cache_seqlens[:, None].to(torch.int32).expand(batch, s_q)
    if causal:
        limit = limit - (s_q - 1) + torch.arange(s_q, device=block_table.device, dtype=torch.int32)[None, :]
    visible = positions[None, None, :] < limit[:, :, None]
    return torch.where(visible, flat[:, None, :], -1).to(torch.int32).contiguous()
