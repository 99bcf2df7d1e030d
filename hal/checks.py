"""Argument checks shared by every operator: dtype, rank, shape, device, layout, value range.

Each check raises the matching :mod:`hal.errors` type with the operator, the argument, what was
expected, what was given and what to do.

Value-range checks read tensor contents (block tables, lengths, indices). On CPU tensors that
costs a few microseconds per call (one ``aminmax``), and they run unless ``HAL_CHECK_VALUES=0``.
On an accelerator each check is a device synchronisation, which stalls the host and breaks the
overlap of launches with kernels (FlashMLA's and DeepGEMM's kernels read these values unchecked),
so there they are opt-in: ``HAL_CHECK_VALUES=1`` (debugging, tests); never while a CUDA graph is
being captured.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hal import compiled_checks, env, optional
from hal.errors import DeviceError, DTypeError, LayoutError, ShapeError, ValueRangeError

__all__ = [
    "FP8",
    "expect_tensor",
    "expect_same_device",
    "expect_int",
    "value_checks_enabled",
    "values_within",
    "first_outside",
    "expect_in_range",
    "expect_rows_in_range",
    "signature",
    "remember",
]

FP8 = torch.float8_e4m3fn
ENV_CHECK_VALUES = "HAL_CHECK_VALUES"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: Sequence[int | None], dims: Sequence[str] | None) -> str:
    parts = []
    for i, size in enumerate(shape):
        name = dims[i] if dims else None
        if size is None:
            parts.append(name or "*")
        else:
            parts.append(f"{name}={size}" if name else str(size))
    return "[" + ", ".join(parts) + "]"


def expect_tensor(
    op: str,
    name: str,
    value: object,
    *,
    dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    dims: Sequence[str] | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument and return it.

    Args:
        op: operator name for messages.
        name: argument name for messages.
        value: the argument.
        dtypes: accepted dtype(s).
        shape: expected sizes; ``None`` entries accept any size (rank is still checked).
        dims: names of the dimensions, used in messages (``("batch", "s_q", "h_q", "d")``).
        contiguous: require a contiguous (row-major, dense) tensor.
    """
    if not isinstance(value, torch.Tensor):
        raise DTypeError(op, name, "a torch.Tensor", type(value).__name__, f"Pass '{name}' as a tensor.")
    if value.layout is not torch.strided or value.is_nested:  # sparse, nested: no strides, and nothing here reads those
        kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise LayoutError(op, name, "a dense (strided) tensor", f"a {kind} tensor", f"Pass '{name}' as one dense tensor ({name}.to_dense() for a sparse one).")
    # Success costs a few attribute reads and comparisons (this runs several times per operator
    # call); the messages are built only on failure.
    if dtypes is not None:
        dtype = value.dtype
        if dtype is not dtypes and (isinstance(dtypes, torch.dtype) or dtype not in dtypes):
            accepted = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
            wanted = " or ".join(_dtype_name(d) for d in accepted)
            raise DTypeError(
                op, name, f"dtype {wanted}", f"dtype {_dtype_name(value.dtype)}", f"Convert '{name}' with .to({wanted.split(' or ')[0]})."
            )
    if shape is not None:
        actual = value.shape
        if len(actual) == len(shape):
            for want, got in zip(shape, actual):
                if want is not None and want != got:
                    break
            else:
                shape = None  # the common case: nothing to report
    if shape is not None:
        actual = tuple(value.shape)
        expected_text = _shape_text(shape, dims)
        if len(actual) != len(shape):
            raise ShapeError(
                op, name, f"a {len(shape)}-d tensor of shape {expected_text}", f"a {len(actual)}-d tensor of shape {list(actual)}",
                f"Reshape '{name}' to {expected_text}.",
            )
        for i, (want, got) in enumerate(zip(shape, actual)):
            if want is not None and want != got:
                dim = dims[i] if dims else f"dim {i}"
                raise ShapeError(
                    op, name, f"shape {expected_text}", f"shape {list(actual)} ({dim} is {got}, not {want})",
                    f"Give '{name}' the shape {expected_text}.",
                )
    if contiguous and not value.is_contiguous():
        raise LayoutError(
            op, name, "a contiguous tensor", f"strides {tuple(value.stride())} for shape {list(value.shape)}",
            f"Pass '{name}.contiguous()'.",
        )
    return value


def expect_same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must live on ``reference``'s device."""
    if reference.is_cpu:  # the common case in one pass of attribute reads (is_cpu: 50 ns; device: 65, and == 100)
        for tensor in others.values():
            if tensor is not None and not tensor.is_cpu:
                break
        else:
            return
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise DeviceError(
                op, name, f"a tensor on {reference.device} (the device of '{reference_name}')", f"a tensor on {tensor.device}",
                f"Move '{name}' with .to('{reference.device}').",
            )


def positive_finite(value: object) -> bool:
    """Whether ``value`` is a real number (a Python or NumPy float, an int; never a bool) with
    0 < value < inf: softmax scales. A plain float is answered without the ``numbers.Real`` check
    (0.1 us where that costs 0.6, on every attention call)."""
    if type(value) is float:
        return 0 < value < math.inf
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < float(value) < math.inf


# Every size, count and length an operator takes as an int is below this: the anchors' kernels
# index with 32-bit ints, and a larger value would reach torch's allocator or a C long as an overflow.
INT_LIMIT = 2**31


def expect_int(op: str, name: str, value: object, *, minimum: int | None = None, allowed: Sequence[int] | None = None) -> int:
    """Check a Python integer argument (bool rejected; below :data:`INT_LIMIT`) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DTypeError(op, name, "an int", type(value).__name__, f"Pass '{name}' as a Python int.")
    if allowed is not None and value not in allowed:
        raise ValueRangeError(op, name, "one of " + ", ".join(map(str, allowed)), str(value), f"Use a supported '{name}'.")
    if minimum is not None and value < minimum:
        raise ValueRangeError(op, name, f"an int >= {minimum}", str(value), f"Use '{name}' >= {minimum}.")
    if value >= INT_LIMIT:
        raise ValueRangeError(op, name, f"an int < 2**31 = {INT_LIMIT}", str(value), f"Sizes and counts are 32-bit ints in the kernels: use a smaller '{name}'.")
    return value


_OFF = frozenset(("0", "false", "no", "off"))
_ON = frozenset(("1", "true", "yes", "on"))
_SETTINGS: dict[Any, str] = {}  # raw HAL_CHECK_VALUES -> "off", "on" or "" (the default)


_read_setting = env.reader(ENV_CHECK_VALUES)


def _setting() -> str:
    raw = _read_setting()
    setting = _SETTINGS.get(raw)
    if setting is None:
        text = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw or "").strip().lower()
        setting = "off" if text in _OFF else "on" if text in _ON else ""
        if len(_SETTINGS) > 16:
            _SETTINGS.clear()
        _SETTINGS[raw] = setting
    return setting


def value_checks_enabled(tensor: torch.Tensor, *, synchronised: bool = False) -> bool:
    """Whether checks that read ``tensor``'s contents should run (see the module docstring): on
    CPU tensors unless ``HAL_CHECK_VALUES`` is off, on other devices only when it is on.

    ``synchronised``: the caller waits for the device anyway (expert-parallel dispatch reads its
    counts on the host), so a check adds no stall: then on every device unless it is off."""
    if tensor.is_cpu:  # the per-call path: is_cpu costs 50 ns where device.type costs 300
        return _setting() != "off"
    if tensor.is_meta:  # no values to read; selection rejects meta tensors with a DeviceError
        return False
    setting = _setting()
    if setting == "off" or (setting != "on" and not synchronised):  # an accelerator: each check would be a host synchronisation
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True  # an accelerator outside graph capture


# NumPy's unsigned twin of each signed integer dtype, and one past the signed maximum: for a bound
# ``0 <= v < high`` with ``high`` at most that, one unsigned maximum checks both sides (a negative
# reads as a value past every such ``high``).
_UNSIGNED: dict[Any, tuple[Any, int]] = {}


def _unsigned(np: Any, dtype: Any) -> tuple[Any, int] | None:
    found = _UNSIGNED.get(dtype)
    if found is None:
        found = (np.dtype(dtype.str.replace("i", "u")), 2 ** (8 * dtype.itemsize - 1)) if dtype.kind == "i" else ()
        _UNSIGNED[dtype] = found
    return found or None


def _within(np: Any, values: Any, low: int, high: int) -> bool:
    """Whether every element of the NumPy integer array ``values`` lies in ``[low, high)``: one
    reduction where the bounds allow it, two otherwise."""
    unsigned = _unsigned(np, values.dtype) if low == 0 else None
    if unsigned is not None and high <= unsigned[1]:
        return bool(np.maximum.reduce(values.view(unsigned[0]), axis=None) < high)
    return bool(np.minimum.reduce(values, axis=None) >= low and np.maximum.reduce(values, axis=None) < high)


# Up to this many elements, value checks that work on Python lists (a row's pages, a bucket's count)
# read CPU tensors as lists: tolist() costs about 0.4 + 0.03 us per element, where NumPy's conversion
# and reduction cost 2-3 us at any size.
SMALL = 64
# A bare range test (min and max, nothing else) reads a list only up to these sizes: past them one
# torch.aminmax (1.8-1.9 us at any small size) is faster. Measured, int32, 1-d: 16 elements 1.0 us
# as a list, 24 1.3, 32 1.6, 64 2.6; 2-d lists cost 0.5 us more (a list per row); 3-d ones more
# still (a 1 x 2 x 32 table 3.6 us, against 1.9), so they always take aminmax.
_LISTED_1D = 24
_LISTED_2D = 16
# Up to this many elements a CPU reduction runs on torch's calling thread (its grain size is 32768):
# aminmax then costs 1.5-2 us where NumPy's conversion and two reductions cost 3. Past it, torch
# wakes its pool, which on busy cores can wait milliseconds for a time slice; NumPy stays on one.
ONE_THREAD = 16384


def values_within(values: torch.Tensor, low: int, high: int, *, synchronised: bool = False) -> bool:
    """Whether every element of ``values`` satisfies ``low <= v < high``, in one reduction; also True
    when its values are not to be read (empty, or per :func:`value_checks_enabled`).

    The fast path of :func:`expect_in_range`, for callers that build their messages (f-strings cost
    microseconds a call) or choose among several bounds only once this says something is out of
    range."""
    if values.numel() == 0 or not value_checks_enabled(values, synchronised=synchronised):
        return True
    if values.dtype == torch.bool:
        return bool(not _outside(values, low, high).any())
    dims = values.dim()
    if dims <= 2 and values.numel() <= (_LISTED_1D if dims == 1 else _LISTED_2D) and not values.is_floating_point() and optional.host_readable(values):
        listed = values.tolist()
        if dims == 1:
            return low <= min(listed) and max(listed) < high
        if dims == 2:
            return low <= min(map(min, listed)) and max(map(max, listed)) < high
        return low <= listed < high  # a 0-d tensor: one number
    if not values.is_floating_point():
        found = compiled_checks.first_outside(((values, low, high),))  # 1.6 us where aminmax and its reads cost 2.7
        if found is not None:
            return found < 0
    if values.numel() > ONE_THREAD:
        np = optional.numpy_for(values) if not values.is_floating_point() else None
        if np is not None:
            return _within(np, values.numpy(), low, high)
    smallest, largest = torch.aminmax(values)
    # item(): Python numbers, so a bound is never wrapped into the dtype and a float's fraction
    # compares as it is; a NaN maximum fails the test, and _outside then names the NaN
    return low <= smallest.item() and largest.item() < high


def first_outside(checks: Sequence[tuple[torch.Tensor, int, int]]) -> int:
    """The position in ``checks`` of the first ``(values, low, high)`` for which
    :func:`values_within` is False; -1 when there is none. Integer CPU tensors are checked together
    in one call of compiled code (:mod:`hal.compiled_checks`: 3.4 us for four index tensors where
    four torch reductions cost 8-9); callers then name the one that failed with
    :func:`expect_in_range`."""
    if _setting() != "off":
        found = compiled_checks.first_outside(checks)
        if found is not None:
            return found
    for position, (values, low, high) in enumerate(checks):
        if not values_within(values, low, high):
            return position
    return -1


def first_outside_fixed(ranges: compiled_checks.FixedRanges | None, tensors: tuple[torch.Tensor | None, ...]) -> int | None:
    """:func:`first_outside` through ranges kept with a remembered argument layout
    (:func:`hal.compiled_checks.fixed_ranges`, built from tensors of the layouts ``tensors`` have
    now): -1 when values are not to be read (``HAL_CHECK_VALUES`` off); None when it cannot answer
    (no ranges, the compiled checks switched off, tracing): the caller then calls
    :func:`first_outside`."""
    if _setting() == "off":
        return -1
    return ranges(*tensors) if ranges is not None else None


def all_within(tensors: Sequence[torch.Tensor], low: int, high: int) -> bool:
    """:func:`values_within` of each of ``tensors`` (the same bounds). Small 1-d CPU tensors are
    read as lists under one look at the setting and at tracing: 1 us where a call each costs 2."""
    small = _setting() != "off"
    for t in tensors:
        small = small and type(t) is torch.Tensor and t.is_cpu and t.dim() == 1 and t.numel() <= SMALL and not t.is_floating_point()
    if not small or not optional.host_readable(tensors[0]):  # host_readable: also not tracing
        return all(values_within(t, low, high) for t in tensors)
    for t in tensors:
        listed = t.tolist()
        if listed and not (low <= min(listed) and max(listed) < high):
            return False
    return True


def _outside(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The mask of elements outside ``[low, high)``, exact for bounds beyond the dtype's range
    (a bound torch would wrap into a narrow dtype, -1 against uint8 say, is vacuous or total)."""
    if values.dtype == torch.bool:
        return (values < low) | (values >= high)
    if values.is_floating_point():  # NaN lies in no range: ~(low <= v < high) says so, < and >= would not
        return ~((values >= low) & (values < high))
    info = torch.iinfo(values.dtype)
    if low > info.max or high <= info.min or low >= high:
        return torch.ones_like(values, dtype=torch.bool)
    bad = torch.zeros_like(values, dtype=torch.bool)
    if low > info.min:
        bad |= values < low
    if high <= info.max:
        bad |= values >= high
    return bad


def expect_in_range(
    op: str, name: str, values: torch.Tensor, low: int, high: int, *, what: str, fix: str,
    where: torch.Tensor | Callable[[], torch.Tensor] | None = None, synchronised: bool = False,
) -> None:
    """Every element of ``values`` must satisfy ``low <= v < high`` (skipped per :func:`value_checks_enabled`).

    Tables whose rows are only read up to a length take :func:`expect_rows_in_range` instead.

    Args:
        what: description of the elements for the message (``"block ids"``).
        fix: what the caller should do.
        where: optional bool mask of ``values``' shape (or a function making it, called only when
            needed); elements outside it are not checked.
        synchronised: see :func:`value_checks_enabled`.
    """
    # One reduction for the common case (all in range, so all of the masked ones too); the mask
    # and the element-wise search only when something is out of range.
    if values_within(values, low, high, synchronised=synchronised):
        return
    bad = _outside(values, low, high)
    if where is not None:
        bad &= where() if callable(where) else where
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = f"[{', '.join(map(str, index))}]"
        raise ValueRangeError(
            op, name, f"{what} in [{low}, {high})", f"{values[index].item()} at {name}{where} ({int(bad.sum())} out of range)", fix
        )


_POSITIONS: dict[tuple[int, int], Any] = {}


def _positions(width: int, per_entry: int) -> Any:
    key = (width, per_entry)
    positions = _POSITIONS.get(key)
    if positions is None:
        if len(_POSITIONS) > 64:
            _POSITIONS.clear()
        np = optional.numpy()
        positions = _POSITIONS[key] = np.arange(width, dtype=np.int64) * per_entry
    return positions


# Call sites ((op, argument)) whose last table held out-of-range padding past the rows' lengths
# (-1 or stale ids): their next call takes the masked maximum directly.
_PADDED: set[tuple[str, str]] = set()


def _remember_padded(site: tuple[str, str]) -> None:
    if len(_PADDED) > 64:
        _PADDED.clear()
    _PADDED.add(site)


def _row_limits(np: Any, lengths: torch.Tensor | Callable[[], torch.Tensor]) -> Any:
    """The tokens each row reads, as a NumPy array [rows]: ``lengths`` [rows], or the longest of
    each row of [rows, k]."""
    limits = lengths() if callable(lengths) else lengths
    limits = limits.numpy() if type(limits) is torch.Tensor and limits.is_cpu else limits.detach().cpu().numpy()
    return np.maximum.reduce(limits, axis=1) if limits.ndim == 2 else limits


def _rows_outside_small(
    table: torch.Tensor, lengths: torch.Tensor | Callable[[], torch.Tensor], low: int, high: int, per_entry: int
) -> tuple[int, int, int] | None:
    """:func:`expect_rows_in_range` on Python lists (a table of at most ``SMALL`` entries): the
    first read entry out of range as (row, column, how many read entries are), or None."""
    rows = table.tolist()  # numel > 0: every row holds an entry
    if low <= min(map(min, rows)) and max(map(max, rows)) < high:  # every entry in range, padding included
        return None
    limits = lengths() if callable(lengths) else lengths
    # the table was host readable, so no tracer or mode is active: a plain CPU tensor is too
    limits = limits.tolist() if type(limits) is torch.Tensor and limits.is_cpu else limits.detach().cpu().tolist()
    first, count = None, 0
    for r, row in enumerate(rows):
        limit = limits[r]
        if type(limit) is list:
            limit = max(limit)
        if limit <= 0:
            continue
        bad = [j for j, v in enumerate(row[: -(-limit // per_entry)]) if not low <= v < high]  # entries j with j * per_entry < limit
        if bad:
            count += len(bad)
            if first is None:
                first = (r, bad[0])
    return None if first is None else (first[0], first[1], count)


def small_pages_within(table: torch.Tensor, lengths: torch.Tensor, most: int, high: int, per_entry: int) -> bool:
    """A small decoding batch's paging, read once as Python lists: whether every length lies in
    ``[0, most]`` and every entry a row reads (:func:`expect_rows_in_range`'s rule, with ``low`` 0)
    lies in ``[0, high)``. False also when the fast path does not apply (a table of more than
    :data:`SMALL` entries, tensors not host readable, value checks off): the caller then runs the
    general checks, which name what is out of range. ``lengths``: integer [rows] or [rows, k]
    (a row read up to the longest of its k lengths).

    Where the two general checks cost 4-6 us on a handful of rows, this costs 1-2. With the
    compiled checks (:mod:`hal.compiled_checks`) any table is read so, in one call (1.3 us)."""
    if _setting() == "off":
        return False
    verdict = compiled_checks.pages_within(table, lengths, most, high, per_entry)
    if verdict is not None:
        return verdict
    if table.numel() > SMALL or not optional.host_readable(table, lengths):
        return False
    limits, rows = lengths.tolist(), table.tolist()
    if limits and type(limits[0]) is list:  # every length in range, then each row's longest
        if min(map(min, limits)) < 0 or max(map(max, limits)) > most:
            return False
        limits = list(map(max, limits))
    elif limits and (min(limits) < 0 or max(limits) > most):
        return False
    for limit, row in zip(limits, rows):  # _rows_outside_small's scan, without naming: sharing it cost 0.3 us a call
        used = row[: -(-limit // per_entry)]
        if used and (min(used) < 0 or max(used) >= high):
            return False
    return True


def expect_rows_in_range(
    op: str, name: str, table: torch.Tensor, lengths: torch.Tensor | Callable[[], torch.Tensor], low: int, high: int, *,
    per_entry: int = 1, what: str, fix: str,
) -> None:
    """Entry ``j`` of row ``r`` of the 2-d ``table`` must satisfy ``low <= v < high`` where it is
    read, that is where ``j * per_entry < lengths[r]``; the rest of a row is padding (skipped per
    :func:`value_checks_enabled`).

    This is the shape of every paged or sparse index in the catalogue: a block table whose row
    holds a sequence's pages then padding (-1, stale ids), with ``lengths`` the sequence lengths in
    tokens and ``per_entry`` the page size; a top-k list cut at its length (``per_entry`` 1).
    ``lengths`` is an integer tensor [rows], or [rows, k] when a row is read up to the longest of
    its k lengths (the next_n query tokens of a sequence), or a function making either.
    One reduction settles the common case (every entry in range, padding included); only when some
    entry is out of range is ``lengths`` (an integer tensor [rows], or a function making it) read.
    CPU tables are read through NumPy when it is installed: a torch operator call costs
    microseconds of dispatch there, and this path runs on every call of engines that pad with -1.
    """
    if table.numel() == 0 or not value_checks_enabled(table):
        return
    if table.numel() <= SMALL and table.dtype != torch.bool and not table.is_floating_point() and optional.host_readable(table):
        found = _rows_outside_small(table, lengths, low, high, per_entry)
        if found is None:
            return
        row, column, count = found
        raise ValueRangeError(
            op, name, f"{what} in [{low}, {high})", f"{int(table[row, column])} at {name}[{row}, {column}] ({count} out of range)", fix
        )
    np = optional.numpy_for(table) if table.dtype != torch.bool and not table.is_floating_point() else None
    if np is not None:
        values = table.numpy()
        unsigned = _unsigned(np, values.dtype) if low == 0 else None
        if unsigned is not None and high <= unsigned[1]:
            # one comparison for both bounds: negatives read as unsigned exceed every such high
            values = values.view(unsigned[0])
            site = (op, name)
            if site in _PADDED:  # padded last time: the masked maximum at once (4 NumPy calls, not 6)
                limits = _row_limits(np, lengths)
                read = np.less(_positions(table.shape[1], per_entry), limits[:, None])
                if np.maximum.reduce(values, axis=None, where=read, initial=0) < high:
                    return
                _PADDED.discard(site)
            elif np.maximum.reduce(values, axis=None) < high:
                return
            bad = np.greater_equal(values, high)
        else:
            bad = np.less(values, low)
            bad |= np.greater_equal(values, high)
            if not np.count_nonzero(bad):
                return
        bad &= np.less(_positions(table.shape[1], per_entry), _row_limits(np, lengths)[:, None])  # only where a row is read
        if not np.count_nonzero(bad):  # count_nonzero: 0.2 us where any() costs 0.9
            if unsigned is not None and high <= unsigned[1]:
                _remember_padded((op, name))
            return
        row, column = (int(i[0]) for i in np.nonzero(bad))
        count = int(np.count_nonzero(bad))
    else:
        smallest, largest = torch.aminmax(table)
        if int(smallest) >= low and int(largest) < high:
            return
        limits = lengths() if callable(lengths) else lengths
        if limits.dim() == 2:
            limits = limits.amax(dim=1)
        positions = torch.arange(table.shape[1], device=table.device, dtype=torch.int64) * per_entry
        mask = _outside(table, low, high) & (positions[None, :] < limits.to(table.device)[:, None])
        if not bool(mask.any()):
            return
        row, column = (int(i) for i in mask.nonzero()[0])
        count = int(mask.sum())
    raise ValueRangeError(
        op, name, f"{what} in [{low}, {high})", f"{int(table[row, column])} at {name}[{row}, {column}] ({count} out of range)", fix
    )


# ---- signatures: structural checks run once per argument layout ------------------------------

class IntBucket(int):
    """How many of its checks' bounds a per-step int reaches (:func:`hal.layouts.int_bucket`): a
    type of its own, so that no argument a caller passes can pass as one in a key."""

    __slots__ = ()


_SIGNABLE = frozenset((int, float, bool, str, type(None), torch.dtype, IntBucket))
_NONE_PART = (type(None), None)


def signature(*values: object) -> tuple[Any, ...] | None:
    """A hashable key of everything an operator's structural checks read from ``values``: for a
    plain tensor its dtype, shape, strides, device and requires_grad; an int, float, bool, str,
    None or dtype with its type (512.0 and True must not pass as 512 and 1); a tuple of those
    scalars element by element (DeepGEMM's recipes). None when a value is anything else (a tensor
    subclass, a list, a tuple holding a tensor), so that the checks run.

    Operators keep the signatures whose structural checks passed (:func:`remember`) and skip those
    checks on a later call with the same signature: engines call each operator with the same
    layouts step after step. About 0.5 us per tensor, where the checks cost 1-2 us per tensor.
    Value checks (contents) are never skipped, and a check that reads anything a signature does not
    hold (a storage's extent or offset, as the MODEL1 cache's does) must not be skipped by one."""
    parts: list[Any] = []
    add = parts.append
    for value in values:
        if value is None:  # optional arguments, often several a call: one shared part
            add(_NONE_PART)
            continue
        kind = type(value)
        if kind is torch.Tensor:
            if value.layout is not torch.strided or value.is_nested:  # no strides to key (sparse, nested): the checks run, and name it
                return None
            add((value.dtype, value.shape, value.stride(), value.device, value.requires_grad))
        elif kind in _SIGNABLE:
            add((kind, value))  # typed: a float or bool equal to an int must not pass as it
        elif kind is tuple and all(type(item) in _SIGNABLE for item in value):
            add((tuple, tuple((type(item), item) for item in value)))
        else:
            return None
    return tuple(parts)


def remember(seen: set[Any] | dict[Any, Any], key: tuple[Any, ...] | None, value: Any = None, limit: int = 1024) -> None:
    """Add ``key`` (from :func:`signature`, after the checks passed) to ``seen``: a set, or a dict
    mapping it to ``value`` (what the checks derived); one that grows past ``limit`` (a workload of
    ever-changing shapes) starts over."""
    if key is None:
        return
    if len(seen) >= limit:
        seen.clear()
    if isinstance(seen, dict):
        seen[key] = value
    else:
        seen.add(key)
