"""The owner-side reduction of expert-parallel combine (``ep_combine_reduce``) on CPU tensors.

The contract (:func:`hal.ops.ep_local.ep_combine_reduce`): ``out[t] = sum over rows i with
src_idx[i] == t of w_i * float(rows[i])``, accumulated in float32 in row order from 0, rounded
once to the rows' dtype. The reference converts every row to float32 at once and scatters it
into a float32 accumulator as large as the output; both are memory passes over hundreds of MB
at DeepSeek-V3 sizes (8192 x 7168 bf16 rows onto 4096 tokens: a 235 MB temporary and a 117 MB
accumulator read and written once per row).

Here the work is token-major: tokens are taken a tile at a time (a float32 tile that stays in
cache), and for copy k = 0, 1, ... every token of the tile adds its k-th row (rows sorted by
token, stably, so each token's rows keep their order). Every token sees the same float32
additions in the same order as in the reference, and memory is touched once: the rows read, the
output written. Tiles where every token has exactly one row, or exactly two and no weights (a
normal combine over two ranks), take one gather, or two gathers and one add rounded once.

The result equals the reference's value for value. Two differences in bits carry no meaning and
are allowed: a NaN's payload, and the sign of a zero sum of zeros (``-0.0 + -0.0`` is ``-0.0``
here where the reference, starting from ``+0.0``, gives ``+0.0``; they compare equal).

Measured on one core of a 2-core AVX-512 EPYC, 8192 x 7168 bf16 rows (two per token) onto 4096
tokens, freed memory retained (:func:`hal.ep.launch.retain_freed_memory`), medians of 7: 20 ms,
against 37 ms for the previous float32-accumulator tiling and 40 ms for the reference.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
from collections.abc import Sequence

import torch

__all__ = ["combine_reduce", "combine_reduce_native", "TILE_BYTES"]

TILE_BYTES = 1 << 20  # float32 tile of tokens: small enough to stay in L2 on the CPUs we target


def combine_reduce(
    rows: torch.Tensor | Sequence[torch.Tensor], src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """``ep_combine_reduce`` (arguments validated by the operator).

    Args:
        rows: [S, H] bf16, fp16 or fp32 (any row stride; rows are gathered); or segments of such
            rows (the ``row_segments`` feature), read where they are: a tile's k-th rows that lie
            consecutively in one segment are a view of it; the first gather that needs rows of
            several segments concatenates them once.
        src_idx: int32 [S], each in [0, num_tokens).
        num_tokens: N.
        weights: float32 [S] or None.

    Returns:
        [N, H], the rows' dtype: each token's (weighted) sum, rounded once; tokens without rows are 0.
    """
    segments = (rows,) if isinstance(rows, torch.Tensor) else tuple(rows)
    rows = segments[0]  # dtype, width and device of them all
    hidden = rows.shape[1]
    ends = list(itertools.accumulate(segment.shape[0] for segment in segments))  # exclusive end row of each segment
    count = ends[-1]
    out = torch.empty(num_tokens, hidden, dtype=rows.dtype, device=rows.device)
    if count == 0 or hidden == 0 or num_tokens == 0:
        return out.zero_()

    joined: list[torch.Tensor] = []

    def gather(which: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Rows ``which`` (indices into the segments' concatenation) into ``into``. Gathers across
        segments go through their concatenation, made on the first one: per-segment gathers
        cost three times the reduction itself when rows of 4 ranks mix in every tile."""
        if len(segments) == 1:
            return torch.index_select(rows, 0, which, out=into)
        if not joined:
            joined.append(torch.cat(segments))
        return torch.index_select(joined[0], 0, which, out=into)

    def piece(first: int, size: int) -> torch.Tensor | None:
        """Rows ``first : first + size`` of the concatenation as a view, when one segment holds them all."""
        s = bisect.bisect_right(ends, first)
        begin = ends[s] - segments[s].shape[0]
        return segments[s][first - begin : first - begin + size] if first + size <= ends[s] else None
    index = src_idx.long()
    order = torch.argsort(index, stable=True)  # rows by token; a token's rows in row order
    copies = torch.bincount(index, minlength=num_tokens)
    starts = torch.cumsum(copies, 0) - copies
    most = int(copies.max())
    # For copy k: the tokens that have a k-th row (ascending) and that row's index.
    tokens_k, rows_k = [], []
    for k in range(most):
        having = torch.nonzero(copies > k).flatten()
        tokens_k.append(having)
        rows_k.append(order[starts[having] + k])
    step = max(1, TILE_BYTES // (4 * hidden))
    edges = torch.arange(0, num_tokens + step, step, device=rows.device).clamp_(max=num_tokens)
    bounds = [torch.searchsorted(t, edges).tolist() for t in tokens_k]  # per k: where each tile's tokens begin
    # consecutive[k][i]: how many of rows_k[k][1..i] follow their predecessor (row + 1). A tile
    # whose k-th copies are consecutive rows reads them as a slice, with no gather: messages
    # arrive grouped by source rank and sorted by token, so this is the common case.
    consecutive = [torch.cat([r.new_zeros(1), torch.cumsum(r.diff() == 1, 0)]).tolist() for r in rows_k]
    tile = torch.empty(min(step, num_tokens), hidden, dtype=torch.float32, device=rows.device)
    scratch = torch.empty_like(tile)
    gathered = [torch.empty(tile.shape, dtype=rows.dtype, device=rows.device) for _ in range(2)]

    def copy_k(k: int, t: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-th rows of tile t's tokens that have one (a slice, or a gather into ``buffer``), and their indices."""
        lo, hi = bounds[k][t], bounds[k][t + 1]
        which = rows_k[k][lo:hi]
        if consecutive[k][hi - 1] - consecutive[k][lo] == hi - 1 - lo:
            part = piece(int(which[0]), hi - lo)
            if part is not None:
                return part, which
        return gather(which, buffer[: hi - lo]), which

    def weighted(part: torch.Tensor, which: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """w * float(row), in float32 as the reference (rows are promoted; ``into`` takes the product)."""
        return part if weights is None else torch.mul(part, weights[which].unsqueeze(1), out=into)

    for t, t0 in enumerate(range(0, num_tokens, step)):
        t1 = min(t0 + step, num_tokens)
        size = t1 - t0
        levels = [bounds[k][t + 1] - bounds[k][t] for k in range(most)]
        depth = sum(1 for n in levels if n)  # tokens with a k-th row have every earlier one too
        acc, target = tile[:size], out[t0:t1]
        if depth == 0:
            target.zero_()
        elif all(n == size for n in levels[:depth]):
            # Every token of the tile has the same number of rows (normal combine: one per rank it
            # went to). The float32 sum's last addition is rounded straight into out: torch
            # computes bf16/fp16 and mixed-dtype arithmetic in float32 on CPU, rounding once.
            if depth == 1:
                part, which = copy_k(0, t, gathered[0])
                if weights is None:
                    target.copy_(part)
                else:
                    weighted(part, which, target)
            elif depth == 2 and weights is None:
                torch.add(copy_k(0, t, gathered[0])[0], copy_k(1, t, gathered[1])[0], out=target)
            else:
                for k in range(depth):
                    part = weighted(*copy_k(k, t, gathered[0]), scratch[:size])
                    if k == 0:
                        acc.copy_(part)
                    elif k < depth - 1:
                        acc.add_(part)
                    else:
                        torch.add(acc, part, out=target)
        else:  # tokens with different numbers of rows: a float32 tile; full copies added, the others scattered in
            for k in range(depth):
                part, which = copy_k(k, t, gathered[0])
                if part.shape[0] == size:  # every token of the tile has this copy
                    part = weighted(part, which, scratch[:size])
                    if k == 0:
                        acc.copy_(part)
                    else:
                        acc.add_(part)
                    continue
                if k == 0:  # some tokens of the tile have no rows at all
                    acc.zero_()
                values = scratch[: part.shape[0]]
                if weights is None:
                    values.copy_(part)  # index_add_ takes float32 rows only
                else:
                    weighted(part, which, values)
                acc.index_add_(0, tokens_k[k][bounds[k][t] : bounds[k][t + 1]] - t0, values)
            target.copy_(acc)
    return out


_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_i32, _ptr, _ptr, _ptr, _i32, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _i32]


def combine_reduce_native(
    lib: ctypes.CDLL, rows: torch.Tensor | Sequence[torch.Tensor], src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None,
    threads: int,
) -> torch.Tensor:
    """``ep_combine_reduce`` on the native kernel ``native/ep_reduce.c`` (arguments validated by the operator).

    One pass per token over its rows in row order (a stable sort of the rows by token, made here),
    summed in an fp32 accumulator of 1024 channels that stays in L1 and rounded once: the
    reference's value bit for bit (NaN payloads aside), every row read once and the output written
    once, whatever the tokens' row counts and wherever their rows lie among the segments. A
    segment whose rows are not unit-stride along the width is copied first.
    """
    segments = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    segments = [s if s.shape[1] <= 1 or s.stride(1) == 1 else s.contiguous() for s in segments]
    first = segments[0]
    hidden = first.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=first.dtype)
    if num_tokens == 0 or hidden == 0:
        return out
    index = src_idx.long()
    order = torch.argsort(index, stable=True)
    starts = torch.zeros(num_tokens + 1, dtype=torch.int64)
    # [:num_tokens]: with value checks off an index past the tokens is the caller's error; its row
    # is then left out (never read past the rows, nor written past the output).
    torch.cumsum(torch.bincount(index, minlength=num_tokens)[:num_tokens], 0, out=starts[1:])
    count = len(segments)
    pointers = (ctypes.c_void_p * count)(*(s.data_ptr() for s in segments))
    ends = (ctypes.c_int64 * count)(*itertools.accumulate(s.shape[0] for s in segments))
    strides = (ctypes.c_int64 * count)(*(s.stride(0) for s in segments))
    w = None if weights is None else weights.contiguous()
    fn = lib.hal_ep_combine_reduce
    if fn.argtypes is None or tuple(fn.argtypes) != tuple(_ARGTYPES):
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    status = fn(count, pointers, ends, strides, _DTYPE_CODES[first.dtype], hidden, order.data_ptr(), starts.data_ptr(), num_tokens,
                None if w is None else w.data_ptr(), out.data_ptr(), threads)
    if status:
        raise RuntimeError(f"hal_ep_combine_reduce refused its arguments (status {status}): a unihal bug, please report it")
    return out
