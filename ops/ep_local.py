"""The local kernels of expert-parallel dispatch and combine: pack, unpack, combine-reduce.

``hal.ep`` moves tokens between processes with torch.distributed collectives; what each rank
does with its own memory around those collectives is these three operators, which a backend
implements like any other (``hal_ep_pack``, ``hal_ep_unpack``, ``hal_ep_combine_reduce``):

- :func:`ep_pack` copies rows into bucket-major order (a bucket is a destination rank, or an
  expert): the send buffer of a dispatch, whose per-bucket counts are the collective's splits.
- :func:`ep_unpack` regroups received rows into fixed-size slots per local expert: DeepEP's
  low-latency receive layout ``[num_local_experts, num_ranks * max_tokens, ...]``, the layout
  of the masked grouped GEMM.
- :func:`ep_combine_reduce` sums rows back into their tokens, optionally weighted: the
  owner-side reduction of a combine (plain sum in normal mode, ``sum_k w_k * y_k`` in
  low-latency mode), accumulated in float32 as DeepEP's combine kernels do.

Rows are opaque to pack and unpack (copied bitwise, any dtype): ``hal.ep`` frames each token's
hidden state, FP8 scales and routing metadata into one byte row, one message per token as in
DeepEP's low-latency kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hal import checks, optional
from hal.checks import (
    expect_in_range, expect_int, expect_same_device, expect_tensor, value_checks_enabled, values_within,
)
from hal.dispatch import call
from hal.errors import DTypeError, ValueRangeError
from hal.layouts import Layouts
from hal.operator import Feature, declare
from hal.selection import select

__all__ = [
    "EP_PACK",
    "EP_UNPACK",
    "EP_COMBINE_REDUCE",
    "ROW_SEGMENTS",
    "reads_row_segments",
    "ep_pack",
    "ep_unpack",
    "ep_combine_reduce",
    "send_order",
    "pack_reference",
    "unpack_reference",
    "combine_reduce_reference",
]

EP_PACK = declare("ep_pack", "hal_ep_pack", "ep", "Copy rows into bucket-major send order (dispatch send buffer)")
EP_UNPACK = declare("ep_unpack", "hal_ep_unpack", "ep", "Regroup received rows into fixed slots per local expert")
# Version 2: rows may come in segments (a tuple of tensors read in order, as if concatenated), so
# that a combine reads the rows a rank sent itself where they already are instead of copying them
# next to the received ones first. A backend written for version 1 is handed one tensor (the
# segments concatenated here).
ROW_SEGMENTS = Feature("row_segments", "rows as a tuple of [S_i, width] tensors, read in order as if concatenated", since=2)
EP_COMBINE_REDUCE = declare(
    "ep_combine_reduce", "hal_ep_combine_reduce", "ep", "Sum (optionally weighted) rows back into their tokens in fp32",
    version=2, features=(ROW_SEGMENTS,),
)

REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def send_order(bucket_idx: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :func:`ep_pack` takes each packed row from, without moving any row.

    Args:
        bucket_idx: int64 [num_rows, num_slots], bucket ids or -1 (validated by the caller).
        num_buckets: B.

    Returns:
        ``src_idx`` int64 [S]: source rows, bucket-major, rows ascending within a bucket (ties:
        slot order); ``num_rows_per_bucket`` int32 [B].
    """
    token, slot = (bucket_idx >= 0).nonzero(as_tuple=True)
    bucket = bucket_idx[token, slot]
    # Row-major nonzero() lists (token, slot) in token order, so a stable sort on the bucket
    # alone yields bucket-major order with tokens ascending (slots ascending on ties).
    order = torch.sort(bucket, stable=True).indices
    return token[order], torch.bincount(bucket, minlength=num_buckets).to(torch.int32)


def pack_reference(rows: torch.Tensor, bucket_idx: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`ep_pack` (arguments already validated)."""
    src_idx, counts = send_order(bucket_idx, num_buckets)
    return rows.index_select(0, src_idx), src_idx.to(torch.int32), counts


def unpack_reference(rows: torch.Tensor, bucket_of_row: torch.Tensor, num_buckets: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`ep_unpack` (arguments already validated)."""
    bucket = bucket_of_row.long()
    counts = torch.bincount(bucket, minlength=num_buckets)
    order = torch.sort(bucket, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(bucket.numel(), device=rows.device) - starts.repeat_interleave(counts)
    destination = torch.empty_like(bucket)
    destination[order] = bucket[order] * num_slots + position
    # Rows move as raw bytes: bitwise for every dtype, fp8 and bool included (index_copy_ has no fp8 kernel).
    raw = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    if raw.stride(-1) != 1:  # size-1 (and empty) dims may carry any stride; a byte view needs 1
        raw = raw.clone(memory_format=torch.contiguous_format)
    raw = raw.contiguous().view(torch.uint8)
    slots = raw.new_zeros((num_buckets * num_slots, raw.shape[1]))
    slots.index_copy_(0, destination, raw)
    return slots.view(rows.dtype).view((num_buckets, num_slots) + tuple(rows.shape[1:])), counts.to(torch.int32)


def _segments(op: str, rows: object) -> tuple[torch.Tensor, ...]:
    """``rows`` as a non-empty tuple of checked [S_i, width] tensors of one dtype, width and device."""
    if isinstance(rows, torch.Tensor):
        expect_tensor(op, "rows", rows, dtypes=REDUCE_DTYPES, shape=(None, None), dims=("S", "width"))
        return (rows,)
    if not isinstance(rows, (tuple, list)) or not rows:
        raise DTypeError(op, "rows", "a tensor [S, width] or a non-empty tuple of them", type(rows).__name__, "Pass the rows as a tensor.")
    first = expect_tensor(op, "rows[0]", rows[0], dtypes=REDUCE_DTYPES, shape=(None, None), dims=("S", "width"))
    for i, segment in enumerate(rows[1:], start=1):
        expect_tensor(op, f"rows[{i}]", segment, dtypes=first.dtype, shape=(None, first.shape[1]), dims=("S_i", "width"))
        expect_same_device(op, "rows[0]", first, **{f"rows[{i}]": segment})
    return tuple(rows)


def reads_row_segments(device_type: str, device_arg: str = "rows") -> bool:
    """Whether the backend selected for ``ep_combine_reduce`` on ``device_type`` tensors takes rows
    in segments (feature ``row_segments``); a selection error is raised, typed."""
    return ROW_SEGMENTS.name in select(EP_COMBINE_REDUCE, device_type, device_arg=device_arg).backend.features(EP_COMBINE_REDUCE)


def combine_reduce_reference(
    rows: torch.Tensor | Sequence[torch.Tensor], src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """Reference for :func:`ep_combine_reduce` (arguments already validated; segments concatenated)."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.cat(tuple(rows))
    values = rows.float()
    if weights is not None:
        values = values * weights.unsqueeze(1)
    total = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
    total.index_add_(0, src_idx.long(), values)
    return total.to(rows.dtype)


def ep_pack(rows: torch.Tensor, bucket_idx: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each row once per bucket it is assigned to, grouped by bucket.

    Args:
        rows: [num_rows, width], any dtype; copied bitwise.
        bucket_idx: int64 [num_rows, num_slots]: bucket ids in [0, num_buckets), -1 for an unused
            slot. A row appears once per valid entry (dispatch passes distinct buckets per row).
        num_buckets: B, e.g. the number of ranks (normal dispatch) or of experts (low latency).

    Returns:
        ``packed`` [S, width], dtype of rows, contiguous, S = number of valid entries: rows of
        bucket 0, then bucket 1, ...; within a bucket by source row ascending (ties: slot order).
        ``src_idx`` int32 [S]: the source row of each packed row.
        ``num_rows_per_bucket`` int32 [B].
    """
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.ep_pack(rows, bucket_idx, num_buckets)
    op = EP_PACK.name
    expect_tensor(op, "rows", rows, shape=(None, None), dims=("num_rows", "width"))
    expect_tensor(op, "bucket_idx", bucket_idx, dtypes=torch.int64, shape=(rows.shape[0], None), dims=("num_rows", "num_slots"))
    expect_int(op, "num_buckets", num_buckets, minimum=1)
    expect_same_device(op, "rows", rows, bucket_idx=bucket_idx)
    if not values_within(bucket_idx, -1, num_buckets):
        expect_in_range(
            op, "bucket_idx", bucket_idx, -1, num_buckets, what=f"bucket ids (-1 for none; num_buckets={num_buckets})",
            fix="Assign each row only to existing buckets, or -1.",
        )
    return call(EP_PACK, "rows", rows.device, rows=rows, bucket_idx=bucket_idx, num_buckets=num_buckets)


def ep_unpack(rows: torch.Tensor, bucket_of_row: torch.Tensor, num_buckets: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup rows into ``num_slots`` fixed slots per bucket, keeping their order within a bucket.

    Args:
        rows: [S, width], any dtype; copied bitwise.
        bucket_of_row: int32 [S], each in [0, num_buckets); at most ``num_slots`` rows per bucket.
        num_buckets: B (local experts).
        num_slots: slots per bucket (``num_ranks * num_max_dispatch_tokens_per_rank``).

    Returns:
        ``slots`` [B, num_slots, width], dtype of rows: bucket b's rows, in their order in ``rows``,
        at slots ``0 .. count[b] - 1``; the remaining slots are zero.
        ``num_rows_per_bucket`` int32 [B].
    """
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        return torch.ops.hal.ep_unpack(rows, bucket_of_row, num_buckets, num_slots)
    op = EP_UNPACK.name
    values = (rows, bucket_of_row, num_buckets, num_slots)
    key, known = _UNPACK_LAYOUTS.lookup(values)
    if known is None:
        expect_tensor(op, "rows", rows, shape=(None, None), dims=("S", "width"))
        expect_tensor(op, "bucket_of_row", bucket_of_row, dtypes=torch.int32, shape=(rows.shape[0],), dims=("S",))
        expect_int(op, "num_buckets", num_buckets, minimum=1)
        expect_int(op, "num_slots", num_slots, minimum=0)
        expect_same_device(op, "rows", rows, bucket_of_row=bucket_of_row)
        _UNPACK_LAYOUTS.remember(values, key)
    _check_buckets(op, bucket_of_row, num_buckets, num_slots)
    return call(EP_UNPACK, "rows", rows.device, rows=rows, bucket_of_row=bucket_of_row, num_buckets=num_buckets, num_slots=num_slots)


def _check_buckets(op: str, bucket_of_row: torch.Tensor, num_buckets: int, num_slots: int) -> None:
    """:func:`ep_unpack`'s value checks: ids in [0, num_buckets), at most num_slots rows in each."""
    if bucket_of_row.shape[0] <= checks.SMALL and optional.host_readable(bucket_of_row) and value_checks_enabled(bucket_of_row):
        ids = bucket_of_row.tolist()  # a few rows: read once as a list, counted there (a tenth of bincount's dispatch)
        if not ids or (min(ids) >= 0 and max(ids) < num_buckets):
            if len(ids) > num_slots:
                counts = [0] * num_buckets
                for bucket in ids:
                    counts[bucket] += 1
                _expect_slots(op, counts, num_slots)
            return
    if not values_within(bucket_of_row, 0, num_buckets):
        expect_in_range(
            op, "bucket_of_row", bucket_of_row, 0, num_buckets, what=f"bucket ids (num_buckets={num_buckets})",
            fix="Every row must belong to a bucket.",
        )
    # No bucket can hold more rows than there are: counting is needed only past num_slots rows.
    if bucket_of_row.shape[0] > num_slots and value_checks_enabled(bucket_of_row):
        np = optional.numpy_for(bucket_of_row)  # ids are in range now: bincount takes them as they are
        counts = np.bincount(bucket_of_row.numpy(), minlength=num_buckets) if np else torch.bincount(bucket_of_row.long(), minlength=num_buckets)
        _expect_slots(op, counts, num_slots)


def _expect_slots(op: str, counts: Any, num_slots: int) -> None:
    """``counts`` (a list, a NumPy array or a tensor [B]): rows per bucket, at most ``num_slots``."""
    most = max(counts) if type(counts) is list else int(counts.max())
    if most > num_slots:
        full = counts.index(most) if type(counts) is list else int(counts.argmax())
        raise ValueRangeError(
            op, "bucket_of_row", f"at most num_slots={num_slots} rows per bucket", f"{most} rows in bucket {full}",
            "Allocate more slots per bucket (a larger num_max_dispatch_tokens_per_rank).",
        )


_UNPACK_LAYOUTS = Layouts()  # argument layouts that passed ep_unpack's structural checks
_COMBINE_LAYOUTS = Layouts()  # argument layouts (segments, indices, weights) that passed ep_combine_reduce's structural checks


def ep_combine_reduce(
    rows: torch.Tensor | Sequence[torch.Tensor], src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum rows into the tokens they came from: ``out[t] = sum over s with src_idx[s] == t of w[s] * rows[s]``.

    Args:
        rows: [S, width] bf16/fp16/fp32; or a tuple of such tensors (one dtype and width) standing
            for their concatenation, in order (``S`` = their rows together): handed as they are to
            a backend that declares the ``row_segments`` feature (the cpu backend reads them where
            they lie; the reference concatenates them), concatenated here for the others.
        src_idx: int32 [S], the token of each row, in [0, num_tokens).
        num_tokens: N.
        weights: float32 [S] or None (plain sum, normal-mode combine).

    Returns:
        [N, width], dtype of rows: accumulated in float32, rounded once; tokens without rows are 0.
    """
    op = EP_COMBINE_REDUCE.name
    if torch.compiler.is_compiling():  # one opaque node for Dynamo; checks run when the graph runs
        segments = _segments(op, rows)
        whole = segments[0] if len(segments) == 1 else torch.cat(segments)
        return torch.ops.hal.ep_combine_reduce(whole, src_idx, num_tokens, weights)
    given = (rows,) if type(rows) is torch.Tensor else rows if type(rows) is tuple else None
    values = (len(given), *given, src_idx, num_tokens, weights) if given else None
    key, known = _COMBINE_LAYOUTS.lookup(values)
    if known is not None:
        segments = given
    else:
        segments = _segments(op, rows)
        total = sum(s.shape[0] for s in segments)
        expect_tensor(op, "src_idx", src_idx, dtypes=torch.int32, shape=(total,), dims=("S",))
        expect_int(op, "num_tokens", num_tokens, minimum=0)
        if weights is not None:
            expect_tensor(op, "weights", weights, dtypes=torch.float32, shape=(total,), dims=("S",))
        expect_same_device(op, "rows", segments[0], src_idx=src_idx, weights=weights)
        _COMBINE_LAYOUTS.remember(values, key)
    first = segments[0]
    if not values_within(src_idx, 0, num_tokens):
        expect_in_range(
            op, "src_idx", src_idx, 0, num_tokens, what=f"token ids (num_tokens={num_tokens})",
            fix="Each row must come from an existing token.",
        )
    if len(segments) == 1:
        rows = first
    else:
        if reads_row_segments(first.device.type):
            return call(EP_COMBINE_REDUCE, "rows", first.device, features=(ROW_SEGMENTS.name,), rows=segments, src_idx=src_idx,
                        num_tokens=num_tokens, weights=weights)
        rows = torch.cat(segments)
    return call(EP_COMBINE_REDUCE, "rows", rows.device, rows=rows, src_idx=src_idx, num_tokens=num_tokens, weights=weights)
