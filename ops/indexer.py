"""DeepSeek-V3.2's lightning indexer (DeepGEMM): the MQA logits that choose each token's sparse top-k.

Two operators, both ``logit[row, key] = Σ_h relu(q[row, h] · k[key] · sf[key]) · w[row, h]``
over FP8 queries and an FP8 key cache with one fp32 scale per key (fp32 accumulation):

- ``mqa_logits`` (``fp8_mqa_logits``, prefill): q e4m3 [seq_len, H, D]; ``kv = (k e4m3
  [seq_len_kv, D], sf float32 [seq_len_kv])``; weights [seq_len, H]; row ``i`` sees keys
  ``cu_seq_len_k_start[i] <= j < cu_seq_len_k_end[i]``. Output ``[seq_len, seq_len_kv]``, or with
  ``max_seqlen_k > 0`` the compressed ``[seq_len, max_seqlen_k]`` whose column ``j`` is key
  ``start[i] + j``.
- ``paged_mqa_logits`` (``fp8_paged_mqa_logits``, decode): q e4m3 [batch, next_n, H, D] over a
  paged cache uint8 [num_blocks, block_kv, 1, D + 4], each block holding its ``block_kv * D`` e4m3
  values then its ``block_kv`` fp32 scales; ``block_table`` int32 [batch, max_blocks] maps
  position ``p`` to block ``block_table[b, p // block_kv]``. Row ``b * next_n + j`` sees positions
  ``p < context_lens[b, j]`` (2-d context_lens, DeepGEMM's current form) or
  ``p <= context_lens[b] - next_n + j`` (1-d, its earlier form). Output ``[batch * next_n, max_context_len]``.

Positions a row does not see hold -inf when ``clean_logits`` (the reference always writes -inf
there; other backends may leave anything unless asked to clean). Logits are float32, or bf16
(``logits_dtype``, the fp32 sum rounded once). NaN and inf in q, k or w propagate.
"""

from __future__ import annotations

from typing import Any

import torch

from hal import optional
from hal.checks import (
    FP8, all_within, expect_in_range, expect_int, expect_rows_in_range, expect_same_device, expect_tensor, remember, small_pages_within,
    values_within,
)
from hal.dispatch import call
from hal.errors import ArgumentError, DTypeError, OperatorNotSupportedError, ShapeError, ValueRangeError
from hal.layouts import Layouts, int_bucket
from hal.operator import Feature, declare

__all__ = [
    "MQA_LOGITS",
    "PAGED_MQA_LOGITS",
    "fp8_mqa_logits",
    "fp8_paged_mqa_logits",
    "fp8_fp4_mqa_logits",
    "fp8_fp4_paged_mqa_logits",
    "get_paged_mqa_logits_metadata",
    "SPLIT_KV",
    "quantize_indexer_keys",
    "pack_paged_indexer_cache",
]

_LOGITS = (
    Feature("bf16_logits", "logits rounded to bf16 (logits_dtype=torch.bfloat16)"),
    Feature("bf16_weights", "bf16 head weights (DeepGEMM: SM100, with bf16 logits)"),
)
MQA_LOGITS = declare(
    "mqa_logits", "hal_mqa_logits", "indexer", "Indexer MQA logits over FP8 keys with per-row key ranges (DeepGEMM fp8_mqa_logits)",
    features=_LOGITS + (Feature("compressed", "compressed output [seq_len, max_seqlen_k] starting at each row's first key"),),
)
PAGED_MQA_LOGITS = declare(
    "paged_mqa_logits", "hal_paged_mqa_logits", "indexer", "Indexer MQA logits over a paged FP8 key cache (DeepGEMM fp8_paged_mqa_logits)",
    features=_LOGITS + (
        Feature("context_lens_1d", "1-d context_lens: row j of a batch sees p <= len - next_n + j"),
    ),
)

_OP = "fp8_mqa_logits"
_PAGED_OP = "fp8_paged_mqa_logits"
HEAD_DIMS = (32, 64, 128)
LOGITS_DTYPES = (torch.float32, torch.bfloat16)
SPLIT_KV = 256  # keys per schedule segment (DeepGEMM's paged kernel)


def _unpack_q(op: str, q: object) -> torch.Tensor:
    """DeepGEMM's fp8_fp4 entry points take ``q`` as ``(values, scales or None)``."""
    if isinstance(q, tuple):
        if len(q) != 2:
            raise ArgumentError(op, "q", "a tensor or a (values, scales) pair", f"a tuple of {len(q)}", "Pass (q_fp8, None).")
        if q[1] is not None:
            raise OperatorNotSupportedError(
                f"{op}: FP4 queries (q given with scales; DeepGEMM's SM100 path) are not in unihal's indexer contract; "
                "pass FP8 queries as (q_fp8, None)."
            )
        q = q[0]
    return q


def _check_logits_dtype(op: str, logits_dtype: object, weights: torch.Tensor) -> torch.dtype:
    if logits_dtype not in LOGITS_DTYPES:
        raise DTypeError(op, "logits_dtype", "torch.float32 or torch.bfloat16", repr(logits_dtype), "Pass torch.float32 (the default).")
    if weights.dtype == torch.bfloat16 and logits_dtype != torch.bfloat16:
        raise DTypeError(op, "weights", "float32 weights with float32 logits", "bf16 weights", "Pass float32 weights, or logits_dtype=torch.bfloat16.")
    return logits_dtype


def _features(logits_dtype: torch.dtype, weights: torch.Tensor, **more: bool) -> frozenset[str]:
    used = {"bf16_logits": logits_dtype == torch.bfloat16, "bf16_weights": weights.dtype == torch.bfloat16, **more}
    return frozenset(name for name, on in used.items() if on)


_MQA_LAYOUTS = Layouts()  # argument layouts that passed _check_mqa_layouts -> the call's features


def _check_mqa_layouts(
    op: str, q: torch.Tensor, kv: object, weights: object, cu_seq_len_k_start: object, cu_seq_len_k_end: object, clean_logits: object,
    max_seqlen_k: object, logits_dtype: object,
) -> None:
    """The structural checks of :func:`fp8_fp4_mqa_logits` (run once per argument layout)."""
    expect_tensor(op, "q", q, dtypes=FP8, shape=(None, None, None), dims=("seq_len", "num_heads", "head_dim"), contiguous=True)
    seq_len, num_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ShapeError(op, "q", "head_dim 32, 64 or 128", f"head_dim {head_dim}", "Use DeepSeek-V3.2's indexer head_dim (128).")
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise ArgumentError(op, "kv", "a (keys, scales) pair", type(kv).__name__, "Pass kv=(k_fp8 [seq_len_kv, D], sf float32 [seq_len_kv]).")
    k, sf = kv
    expect_tensor(op, "kv[0]", k, dtypes=FP8, shape=(None, head_dim), dims=("seq_len_kv", "head_dim"), contiguous=True)
    seq_len_kv = k.shape[0]
    expect_tensor(op, "kv[1]", sf, dtypes=torch.float32, shape=(seq_len_kv,), dims=("seq_len_kv",), contiguous=True)
    expect_tensor(op, "weights", weights, dtypes=(torch.float32, torch.bfloat16), shape=(seq_len, num_heads), dims=("seq_len", "num_heads"))
    if num_heads and weights.stride(1) != 1:
        raise ArgumentError(op, "weights", "unit stride along num_heads", f"strides {tuple(weights.stride())}", "Pass weights.contiguous().")
    _check_logits_dtype(op, logits_dtype, weights)
    for name, bound in (("cu_seq_len_k_start", cu_seq_len_k_start), ("cu_seq_len_k_end", cu_seq_len_k_end)):
        expect_tensor(op, name, bound, dtypes=torch.int32, shape=(seq_len,), dims=("seq_len",), contiguous=True)
    expect_int(op, "max_seqlen_k", max_seqlen_k, minimum=0)
    if max_seqlen_k and clean_logits:
        raise ArgumentError(op, "clean_logits", "False with max_seqlen_k > 0 (as DeepGEMM)", "True", "Pass clean_logits=False for the compressed output.")
    expect_same_device(op, "q", q, k=k, sf=sf, weights=weights, cu_seq_len_k_start=cu_seq_len_k_start, cu_seq_len_k_end=cu_seq_len_k_end)


def fp8_fp4_mqa_logits(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None],
    kv: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
    logits_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Indexer logits for a prefill chunk (DeepGEMM's ``fp8_fp4_mqa_logits``; FP8 inputs).

    Args:
        q: float8_e4m3fn [seq_len, H, D] contiguous (D in 32/64/128), or ``(q, None)``.
        kv: ``(k float8_e4m3fn [seq_len_kv, D] contiguous, sf float32 [seq_len_kv])``: key ``j``
            is ``k[j] * sf[j]``.
        weights: float32 [seq_len, H] (bf16 with bf16 logits), unit stride on H.
        cu_seq_len_k_start / cu_seq_len_k_end: int32 [seq_len] in [0, seq_len_kv]: row ``i``
            sees keys in ``[start[i], end[i])`` (empty when end <= start).
        clean_logits: write -inf at keys outside a row's range (not allowed with ``max_seqlen_k``,
            as DeepGEMM); without it those positions are unspecified.
        max_seqlen_k: 0 for the full ``[seq_len, seq_len_kv]`` output; otherwise the compressed
            ``[seq_len, max_seqlen_k]`` output, column ``j`` = key ``start[i] + j``.
        logits_dtype: torch.float32 or torch.bfloat16.

    Returns:
        logits [seq_len, seq_len_kv] or [seq_len, max_seqlen_k] of ``logits_dtype``.
    """
    op = _OP
    q = _unpack_q(op, q)
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.mqa_logits(q, kv[0], kv[1], weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, logits_dtype)
    # max_seqlen_k, the longest row's keys, changes with the batch: keyed by off / on, not by value
    # (clean_logits as a bool or int only: a tensor flag would be keyed by its layout, not its value)
    keyed = type(kv) is tuple and type(clean_logits) in (bool, int)
    values = (q, *kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, int_bucket(max_seqlen_k, 0, 1), logits_dtype) if keyed else None
    key, features = _MQA_LAYOUTS.lookup(values)
    if features is None:
        _check_mqa_layouts(op, q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, logits_dtype)
        features = _features(logits_dtype, weights, compressed=max_seqlen_k > 0)
        _MQA_LAYOUTS.remember(values, key, features)
    k, sf = kv
    seq_len_kv = k.shape[0]
    if not all_within((cu_seq_len_k_start, cu_seq_len_k_end), 0, seq_len_kv + 1):
        for name, bound in (("cu_seq_len_k_start", cu_seq_len_k_start), ("cu_seq_len_k_end", cu_seq_len_k_end)):
            expect_in_range(op, name, bound, 0, seq_len_kv + 1, what="key positions", fix=f"Keep each row's key range inside [0, seq_len_kv={seq_len_kv}].")
    return call(
        MQA_LOGITS, "q", q.device, features=features,
        q=q, k=k, k_scales=sf, weights=weights, k_start=cu_seq_len_k_start, k_end=cu_seq_len_k_end,
        clean_logits=bool(clean_logits), max_seqlen_k=max_seqlen_k, logits_dtype=logits_dtype,
    )


def fp8_mqa_logits(
    q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True, max_seqlen_k: int = 0,
) -> torch.Tensor:
    """DeepGEMM's ``fp8_mqa_logits``: :func:`fp8_fp4_mqa_logits` with float32 logits."""
    return fp8_fp4_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, torch.float32)


def get_paged_mqa_logits_metadata(
    context_lens: torch.Tensor, block_kv: int, num_sms: int, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """A balanced split of the paged logits work over ``num_sms`` workers (DeepGEMM's metadata form).

    Each row's keys are cut into segments of :data:`SPLIT_KV`; entry ``i`` of the result is
    ``(first row, first segment in it)`` of worker ``i``, and entry ``num_sms`` is ``(rows, 0)``.
    Computed on the device with tensor ops (no host sync); plain CPU tensors outside tracing take
    the same arithmetic in NumPy, which costs a fraction of the torch calls' dispatch, and
    ``context_lens`` of up to 256 entries looks its split up by the rows' segment counts (they change once in
    :data:`SPLIT_KV` tokens, so a decoding step mostly repeats the last step's split). unihal's
    backends compute logits from the inputs alone and accept any schedule of this shape: it is a
    hint, never a contract.

    Args:
        context_lens: int32 [batch, next_n] (or [batch]).
        block_kv: the cache's page size (> 0).
        num_sms: the worker count (> 0); ``hal.compat.deep_gemm.get_num_sms()`` gives DeepGEMM's.
        indices: int32 [batch] (varlen rows; accepted, it does not change the split).

    Returns:
        int32 [num_sms + 1, 2].
    """
    op = "get_paged_mqa_logits_metadata"
    if not isinstance(context_lens, torch.Tensor) or context_lens.dim() not in (1, 2):
        raise ShapeError(op, "context_lens", "an int32 tensor [batch, next_n] or [batch]", repr(getattr(context_lens, "shape", type(context_lens).__name__)), "Pass the context lengths.")
    expect_tensor(op, "context_lens", context_lens, dtypes=torch.int32)
    if context_lens.dim() == 2 and context_lens.shape[1] < 1:
        raise ShapeError(op, "context_lens", "next_n >= 1 (a length per query token)", f"shape {list(context_lens.shape)}", "Give every sequence at least one query token.")
    expect_int(op, "block_kv", block_kv, minimum=1)
    expect_int(op, "num_sms", num_sms, minimum=1)
    if indices is not None:
        expect_tensor(op, "indices", indices, dtypes=torch.int32, shape=(context_lens.shape[0],), dims=("batch",))
    np = optional.numpy_for(context_lens)
    if np is not None and context_lens.numel() <= _SMALL_BATCH:
        # A decoding step's batch: the split depends only on each row's segment count, which
        # changes once in SPLIT_KV tokens, so the split of the same counts is looked up.
        listed = context_lens.tolist()
        counts = tuple([(n + SPLIT_KV - 1) // SPLIT_KV if n > 0 else 0 for n in (listed if context_lens.dim() == 1 else [row[-1] for row in listed])])
        key = (counts, num_sms)
        meta = _SPLITS.get(key)
        if meta is None:
            meta = _split_segments(np, np.array(counts, dtype=np.int64) * SPLIT_KV, num_sms)
            remember(_SPLITS, key, meta, limit=256)
        return torch.from_numpy(meta.copy())  # a copy: the caller owns (and may write) the result
    lens = context_lens if context_lens.dim() == 1 else context_lens[:, -1]
    if np is not None:  # plain CPU tensors, not traced: the same arithmetic in NumPy (a dozen torch calls cost ~60 us of dispatch)
        return torch.from_numpy(_split_segments(np, lens.numpy(), num_sms))
    segments = (lens.clamp(min=0).to(torch.int64) + SPLIT_KV - 1) // SPLIT_KV
    ends = torch.cumsum(segments, 0)  # exclusive end segment of each row
    total = ends[-1:] if ends.numel() else torch.zeros(1, dtype=torch.int64, device=lens.device)
    workers = torch.arange(num_sms, device=lens.device, dtype=torch.int64)
    starts = workers * total // num_sms  # worker i starts at segment floor(i * total / num_sms)
    row = torch.searchsorted(ends, starts, right=True)
    before = torch.where(row > 0, ends[(row - 1).clamp(min=0)] if ends.numel() else starts * 0, torch.zeros_like(starts))
    meta = torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=lens.device)
    meta[:num_sms, 0] = row.to(torch.int32)
    meta[:num_sms, 1] = (starts - before).to(torch.int32)
    meta[num_sms, 0] = lens.shape[0]
    return meta


def _split_segments(np: Any, lens: Any, num_sms: int) -> Any:
    """:func:`get_paged_mqa_logits_metadata`'s split of ``lens`` (a NumPy int array [rows]) over
    ``num_sms`` workers, as an int32 NumPy array [num_sms + 1, 2]. Each NumPy call on these small
    arrays costs about a microsecond of dispatch, so the arithmetic is written in as few as it takes."""
    rows = len(lens)
    ends = np.zeros(rows + 1, dtype=np.int64)  # ends[r + 1]: exclusive end segment of row r; ends[0] = 0
    np.cumsum((lens.clip(0).astype(np.int64) + (SPLIT_KV - 1)) // SPLIT_KV, out=ends[1:])
    workers = _WORKERS.get(num_sms)
    if workers is None:
        if len(_WORKERS) > 16:
            _WORKERS.clear()
        workers = _WORKERS[num_sms] = np.arange(num_sms, dtype=np.int64)
    starts = workers * int(ends[-1]) // num_sms  # worker i starts at segment floor(i * total / num_sms)
    row = ends[1:].searchsorted(starts, "right")
    meta = np.empty((num_sms + 1, 2), dtype=np.int32)
    meta[:num_sms, 0] = row
    meta[:num_sms, 1] = starts - ends[row]
    meta[num_sms] = (rows, 0)
    return meta


_WORKERS: dict[int, Any] = {}  # num_sms -> NumPy arange(num_sms): the same few counts every step
_SMALL_BATCH = 256  # context_lens entries up to which the split is looked up by segment counts
_SPLITS: dict[tuple[tuple[int, ...], int], Any] = {}  # (segment counts, num_sms) -> the split (NumPy int32 [num_sms + 1, 2])


def _split_paged_cache(op: str, kv_cache: object, head_dim: int) -> tuple[int, int]:
    expect_tensor(op, "kv_cache", kv_cache, dtypes=torch.uint8, shape=(None, None, 1, head_dim + 4), dims=("num_blocks", "block_kv", "h_kv", "head_dim + 4"))
    num_blocks, block_kv = kv_cache.shape[:2]
    if block_kv and (kv_cache.stride(1) != head_dim + 4 or kv_cache.stride(3) != 1 or kv_cache.stride(0) % 4):
        raise ArgumentError(
            op, "kv_cache", f"each block packed ({block_kv} x {head_dim} e4m3 values, then {block_kv} fp32 scales; stride(1) = {head_dim + 4})",
            f"strides {tuple(kv_cache.stride())}", "Build it with hal.pack_paged_indexer_cache, or keep each block contiguous.",
        )
    return num_blocks, block_kv


_PAGED_LAYOUTS = Layouts()  # argument layouts that passed _check_paged_layouts -> the call's features


def _check_paged_layouts(
    op: str, q: torch.Tensor, kv_cache: object, weights: object, context_lens: object, block_table: object, schedule_meta: object,
    max_context_len: object, logits_dtype: object, indices: object,
) -> None:
    """The structural checks of :func:`fp8_fp4_paged_mqa_logits` (run once per argument layout)."""
    expect_tensor(op, "q", q, dtypes=FP8, shape=(None, None, None, None), dims=("batch", "next_n", "num_heads", "head_dim"), contiguous=True)
    batch, next_n, num_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ShapeError(op, "q", "head_dim 32, 64 or 128", f"head_dim {head_dim}", "Use DeepSeek-V3.2's indexer head_dim (128).")
    if next_n < 1:
        raise ShapeError(op, "q", "next_n >= 1", f"next_n {next_n}", "Give every sequence at least one query token.")
    _split_paged_cache(op, kv_cache, head_dim)
    expect_tensor(op, "weights", weights, dtypes=(torch.float32, torch.bfloat16), shape=(batch * next_n, num_heads), dims=("batch * next_n", "num_heads"))
    if num_heads and weights.stride(1) != 1:
        raise ArgumentError(op, "weights", "unit stride along num_heads", f"strides {tuple(weights.stride())}", "Pass weights.contiguous().")
    _check_logits_dtype(op, logits_dtype, weights)
    expect_int(op, "max_context_len", max_context_len, minimum=0)
    if not isinstance(context_lens, torch.Tensor) or context_lens.dim() not in (1, 2):
        raise ShapeError(op, "context_lens", f"an int32 tensor [batch={batch}, next_n={next_n}] or [batch={batch}]",
                         repr(getattr(context_lens, "shape", type(context_lens).__name__)), "Pass one length per row (2-d) or per sequence (1-d).")
    two_d = context_lens.dim() == 2
    expect_tensor(op, "context_lens", context_lens, dtypes=torch.int32, shape=(batch, next_n) if two_d else (batch,),
                  dims=("batch", "next_n") if two_d else ("batch",), contiguous=True)
    expect_tensor(op, "block_table", block_table, dtypes=torch.int32, shape=(batch, None), dims=("batch", "max_blocks"))
    if block_table.shape[1] and block_table.stride(1) != 1:
        raise ArgumentError(op, "block_table", "unit stride along max_blocks", f"strides {tuple(block_table.stride())}", "Pass block_table.contiguous().")
    expect_tensor(op, "schedule_meta", schedule_meta, dtypes=torch.int32, shape=(None, 2), dims=("num_sms + 1", "2"))
    if schedule_meta.shape[0] < 2:
        raise ShapeError(op, "schedule_meta", "[num_sms + 1, 2] with num_sms >= 1", f"shape {list(schedule_meta.shape)}", "Pass get_paged_mqa_logits_metadata(...).")
    if indices is not None:
        expect_tensor(op, "indices", indices, dtypes=torch.int32, shape=(batch,), dims=("batch",), contiguous=True)
        if next_n != 1:
            raise ValueRangeError(op, "indices", "None unless next_n == 1 (varlen rows)", f"a tensor with next_n = {next_n}", "Flatten the rows to next_n = 1.")
    expect_same_device(op, "q", q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table,
                       schedule_meta=schedule_meta, indices=indices)


def fp8_fp4_paged_mqa_logits(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None],
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    logits_dtype: torch.dtype = torch.float32,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer logits for decode over the paged FP8 key cache (DeepGEMM's ``fp8_fp4_paged_mqa_logits``).

    Args:
        q: float8_e4m3fn [batch, next_n, H, D] contiguous, or ``(q, None)``.
        kv_cache: uint8 [num_blocks, block_kv, 1, D + 4]: per block ``block_kv * D`` e4m3 bytes,
            then ``block_kv`` fp32 scales (:func:`pack_paged_indexer_cache` builds it).
        weights: float32 [batch * next_n, H] (bf16 with bf16 logits), unit stride on H.
        context_lens: int32 [batch, next_n] (row ``j`` sees ``p < len[b, j]``) or [batch]
            (row ``j`` sees ``p <= len[b] - next_n + j``), at most ``max_context_len``.
        block_table: int32 [batch, max_blocks], unit stride on blocks; entries a row reads are in
            [0, num_blocks).
        schedule_meta: int32 [num_sms + 1, 2] from :func:`get_paged_mqa_logits_metadata`.
        max_context_len: the output's width.
        clean_logits: write -inf at positions a row does not see.
        logits_dtype: torch.float32 or torch.bfloat16.
        indices: int32 [batch] or None: the sequence each row belongs to (varlen; next_n = 1).
            A scheduling hint: rows already carry their own block_table rows and lengths.

    Returns:
        logits [batch * next_n, max_context_len] of ``logits_dtype``.
    """
    op = _PAGED_OP
    q = _unpack_q(op, q)
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.paged_mqa_logits(
            q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, logits_dtype, indices
        )
    # max_context_len may grow every step: its layout check is "an int >= 0"; its value is checked below
    values = (q, kv_cache, weights, context_lens, block_table, schedule_meta, int_bucket(max_context_len, 0), logits_dtype, indices)
    key, features = _PAGED_LAYOUTS.lookup(values)
    if features is None:
        _check_paged_layouts(op, q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, logits_dtype, indices)
        features = _features(logits_dtype, weights, context_lens_1d=context_lens.dim() == 1)
        _PAGED_LAYOUTS.remember(values, key, features)
    num_blocks, block_kv = kv_cache.shape[:2]
    capacity = block_table.shape[1] * block_kv
    if not small_pages_within(block_table, context_lens, min(max_context_len, capacity), num_blocks, block_kv):
        # not a small batch all in range: the general checks, which name what is out of range
        if not values_within(context_lens, 0, min(max_context_len, capacity) + 1):  # one reduction for both bounds
            expect_in_range(op, "context_lens", context_lens, 0, max_context_len + 1, what="context lengths",
                            fix=f"Pass max_context_len >= the longest context ({max_context_len} given).")
            expect_in_range(op, "context_lens", context_lens, 0, capacity + 1,
                            what=f"context lengths (at most block_table's {block_table.shape[1]} pages x block_kv={block_kv})",
                            fix=f"Give block_table enough columns for the longest context ({block_table.shape[1]} given).")
        expect_rows_in_range(op, "block_table", block_table, context_lens, 0, num_blocks, per_entry=block_kv,
                             what="block ids (for the pages a row reads)",
                             fix=f"Point every page a row reads at one of the cache's {num_blocks} blocks.")
    return call(
        PAGED_MQA_LOGITS, "q", q.device,
        features=features,
        q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table,
        max_context_len=max_context_len, clean_logits=bool(clean_logits), logits_dtype=logits_dtype,
    )


def fp8_paged_mqa_logits(
    q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
    schedule_meta: torch.Tensor, max_context_len: int, clean_logits: bool = False, indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepGEMM's ``fp8_paged_mqa_logits``: :func:`fp8_fp4_paged_mqa_logits` with float32 logits."""
    return fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits, torch.float32, indices)


def quantize_indexer_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key FP8 cast of indexer keys, DeepGEMM's recipe: ``sf = max(amax(|k|), 1e-4) / 448``.

    keys float [..., D] -> ``(e4m3 [..., D], float32 [...])`` with ``k ≈ values * sf``.
    """
    amax = keys.abs().float().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    sf = amax / 448.0
    return (keys.float() * (1.0 / sf)).to(FP8), sf.squeeze(-1)


def pack_paged_indexer_cache(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 [num_blocks, block_kv, D] and float32 [num_blocks, block_kv] -> the fused uint8
    [num_blocks, block_kv, 1, D + 4] cache of :func:`fp8_paged_mqa_logits`."""
    num_blocks, block_kv, head_dim = values.shape
    fused = torch.empty(num_blocks, block_kv * (head_dim + 4), dtype=torch.uint8, device=values.device)
    fused[:, : block_kv * head_dim] = values.reshape(num_blocks, -1).view(torch.uint8)
    fused[:, block_kv * head_dim :] = scales.reshape(num_blocks, -1).contiguous().view(torch.uint8)
    return fused.view(num_blocks, block_kv, 1, head_dim + 4)
