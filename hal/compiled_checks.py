"""Value checks in compiled code: whether integer CPU tensors hold only values in given ranges.

Every operator that takes index tensors (block tables, sequence lengths, sparse indices, expert
ids) reads them on CPU tensors before its kernel runs, so that an index out of range raises a
typed error instead of reading past a buffer (see :mod:`hal.checks`). In torch, each such check is
a reduction and two ``item()`` reads: about 2.5 us a tensor, and a DeepSeek-V3.2 decode step with
its extra cache has four of them. Here one call checks several tensors in a few lines of C
(``csrc/value_ranges.c``), about 0.7 us for one tensor and 1.2 us for four. Where a caller
remembers an argument layout (:class:`hal.layouts.Layouts`), :func:`fixed_ranges` keeps what that
layout fixes (element counts, sizes, bounds) and a call passes only the tensors' addresses
(:class:`FixedRanges`). DeepGEMM's contiguous layout (:func:`contiguous_blocks`) and a paged
batch's lengths and pages (:func:`pages_within`) are checked in one pass each.

The library is compiled lazily, once per machine, with this machine's C compiler (see
:mod:`hal.ccompiler`) into ``$HAL_CACHE_DIR/checks/<key>.so``, ``key`` hashing the source, the
compiler and the flags, and checked on known values when it is loaded. Without a compiler, when the
build or that check fails, or with ``HAL_COMPILED_CHECKS=0``, :func:`first_outside` answers None and
the callers check in torch: the same verdicts, only slower (the tests compare both). Only
contiguous int32 and int64 CPU tensors, outside tracing, are read here; the callers check any
other tensor in torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hal import env
from hal.canary import cache_dir
from hal.ccompiler import compile_library, compiler, compiler_version, tail, write_atomically
from hal.optional import _tracing

__all__ = ["ENV_COMPILED_CHECKS", "SOURCE", "first_outside", "FixedRanges", "fixed_ranges", "contiguous_blocks", "pages_within", "status"]

ENV_COMPILED_CHECKS = "HAL_COMPILED_CHECKS"
SOURCE = Path(__file__).parent / "csrc" / "value_ranges.c"
_FLAGS = (("-O3", "-march=native", "-std=c11", "-fPIC", "-shared"), ("-O3", "-std=c11", "-fPIC", "-shared"))
_OFF = {"0", "false", "no", "off"}
_SIZES = {torch.int32: 4, torch.int64: 8}
_MOST = 8  # tensors a call checks at most
_pack = struct.Struct("=5q").pack_into
_pack9 = struct.Struct("=9q").pack_into
_local = threading.local()  # each thread's spec buffer: a call writes it, then the C function reads it

_read_switch = env.reader(ENV_COMPILED_CHECKS)
_lock = threading.Lock()
_by_switch: dict[Any, Any] = {}  # the switch's raw value -> the C function, or None
_why: list[str] = []  # why the library is not used (the last reason), for status()


def _build() -> ctypes.CDLL | str:
    """The loaded library, or why there is none."""
    cc = compiler()
    if cc is None:
        return "no C compiler (set CC, or install gcc or clang)"
    found = compiler_version(cc)
    if found is None:
        return f"the C compiler {' '.join(cc)!r} does not run"
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        return f"cannot read {SOURCE}: {exc}"
    folder = cache_dir() / "checks"
    for flags in _FLAGS:
        key = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), found[0].encode(), " ".join(flags).encode()])).hexdigest()[:24]
        path, failed = folder / f"{key}.so", folder / f"{key}.err"
        try:
            if failed.exists():
                continue
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                error = compile_library(cc, flags, (SOURCE,), path, timeout_s=60)
                if error is not None:
                    write_atomically(failed, tail(error).encode())
                    continue
            return ctypes.PyDLL(str(path))  # PyDLL: the call keeps the GIL (it takes microseconds; releasing it costs more)
        except OSError as exc:
            return f"cannot build or load {path}: {exc}"
    return f"the build failed (see {folder}/*.err)"


def _resolve(raw: Any) -> Any:
    text = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw or "").strip().lower()
    if text in _OFF:
        _why[:] = [f"{ENV_COMPILED_CHECKS}={text}"]
        return None
    library = _build()
    if isinstance(library, str):
        _why[:] = [library]
        return None
    try:
        function, blocks, pages, fixed = library.hal_first_outside, library.hal_contiguous_blocks, library.hal_pages_within, library.hal_first_outside_fixed
    except AttributeError as exc:
        _why[:] = [f"the built library lacks a function: {exc}"]
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p]  # the spec's address as a Python int
    function.restype = fixed.restype = ctypes.c_int
    fixed.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    blocks.argtypes = pages.argtypes = [ctypes.c_void_p]
    blocks.restype = pages.restype = ctypes.c_int
    # Known answers before first use: a compiler that miscompiles it must not pass bad indices.
    # (ctypes arrays, not tensors: the first use may come under a tracing mode, whose tensors hold no data.)
    probe32, probe64 = (ctypes.c_int32 * 4)(3, -1, 7, 0), (ctypes.c_int64 * 2)(2**40, -5)
    answers = []
    for bounds in ((-1, 8, -5, 2**40 + 1), (0, 8, -5, 2**40 + 1), (-1, 8, -5, 2**40), (-1, 7, -5, 2**40 + 1)):
        spec = (ctypes.c_int64 * 10)(ctypes.addressof(probe32), 4, 4, bounds[0], bounds[1], ctypes.addressof(probe64), 2, 8, bounds[2], bounds[3])
        answers.append(function(2, spec))
        addresses = (ctypes.c_int64 * 3)(0, ctypes.addressof(probe32), ctypes.addressof(probe64))  # the first: not given (count 0)
        kept = (ctypes.c_int64 * 12)(0, 4, 0, 0, 4, 4, bounds[0], bounds[1], 2, 8, bounds[2], bounds[3])
        found = fixed(3, addresses, kept)
        answers.append(found - 1 if found > 0 else found)  # each tensor one place later than in spec
    layout = (ctypes.c_int32 * 12)(2, 2, -1, -1, -1, -1, -1, -1, 0, -1, -1, -1)
    firsts = (ctypes.c_int32 * 3)(7, 7, 7)
    for groups, expected in ((3, 0), (2, 1)):
        answers.append(blocks((ctypes.c_int64 * 5)(ctypes.addressof(layout), 12, 4, groups, ctypes.addressof(firsts))) == expected)
    broken = (ctypes.c_int32 * 4)(1, -1, 1, -1)
    answers.append(blocks((ctypes.c_int64 * 5)(ctypes.addressof(broken), 4, 4, 3, ctypes.addressof(firsts))) == 1)
    table, lengths = (ctypes.c_int32 * 6)(0, 1, -1, 2, -1, -1), (ctypes.c_int32 * 2)(65, 64)  # rows [0, 1, -1] and [2, -1, -1], pages of 64
    for most, high, expected in ((128, 3, 1), (128, 2, 0), (64, 3, 0)):
        answers.append(pages((ctypes.c_int64 * 9)(ctypes.addressof(table), 2, 3, 4, ctypes.addressof(lengths), 1, most, high, 64)) == expected)
    if answers != [0, 0, 1, 1, 2, 2, 1, 1] + [True] * 6 or firsts[:] != [2, -1, 0]:
        _why[:] = [f"the built library gives wrong answers on known values ({answers}, {firsts[:]})"]
        return None
    _why.clear()
    return function, blocks, pages, fixed


def _function() -> Any:
    raw = _read_switch()
    found = _by_switch.get(raw, _by_switch)
    if found is _by_switch:
        with _lock:
            found = _by_switch.get(raw, _by_switch)
            if found is _by_switch:
                found = _by_switch[raw] = _resolve(raw)
    return found


def first_outside(checks: Sequence[tuple[torch.Tensor, int, int]]) -> int | None:
    """The position in ``checks`` of the first ``(tensor, low, high)`` whose tensor holds a value
    outside ``[low, high)``; -1 when every value of every tensor lies in its range. None when these
    checks cannot be done here (no library, a tensor that is not a contiguous int32/int64 CPU
    tensor, a bound that is not an int64, tracing): the caller then checks in torch.

    The caller decides whether values are to be checked at all (:func:`hal.checks.value_checks_enabled`)."""
    functions = _function()
    if functions is None or len(checks) > _MOST:
        return None
    buffer, address = getattr(_local, "spec", None) or _spec_buffer()
    offset = 0
    try:
        for tensor, low, high in checks:
            # type(): a subclass (a FakeTensor) has no values to read; is_cpu costs 50 ns where device.type costs 300
            if type(tensor) is not torch.Tensor or not tensor.is_cpu or not tensor.is_contiguous():
                return None
            size = _SIZES.get(tensor.dtype)
            if size is None:
                return None
            _pack(buffer, offset, tensor.data_ptr(), tensor.numel(), size, low, high)  # struct.error for a bound beyond int64 or not an int
            offset += 40
    except struct.error:
        return None
    if _tracing():  # torch.compile and dispatch modes must see torch operations
        return None
    found = functions[0](len(checks), address)
    return found - 1 if found >= 0 else None  # < 0: an element size it does not read (none is passed)


class FixedRanges:
    """:func:`first_outside` for tensors whose layouts a caller checked and remembered (see
    :func:`fixed_ranges`): their element counts, sizes and bounds are kept, so a call passes only
    their addresses. 0.5 us for four tensors where :func:`first_outside` costs 2.5."""

    __slots__ = ("_fixed", "_address", "_pack", "_count")

    def __init__(self, fixed: ctypes.Array, count: int) -> None:
        self._fixed = fixed  # kept alive with its address
        self._address = ctypes.addressof(fixed)
        self._pack = struct.Struct(f"={count}q").pack_into
        self._count = count

    def __call__(self, *tensors: torch.Tensor | None) -> int | None:
        """``tensors``: in the order and with the layouts (the Nones in place) they were built
        from; as :func:`first_outside`, None where it cannot answer here."""
        functions = _function()
        if functions is None or _tracing():
            return None
        buffer, address = getattr(_local, "spec", None) or _spec_buffer()
        self._pack(buffer, 0, *[0 if tensor is None else tensor.data_ptr() for tensor in tensors])
        found = functions[3](self._count, address, self._address)
        return found - 1 if found >= 0 else None


def fixed_ranges(checks: Sequence[tuple[torch.Tensor | None, int, int]]) -> FixedRanges | None:
    """A :class:`FixedRanges` for ``checks`` (``(tensor or None, low, high)``), to be used only
    with tensors of the same layouts (what a remembered argument layout guarantees: dtype, shape,
    strides, device, exact type) and bounds that those layouts fix; None where its tensors cannot
    be read here (as :func:`first_outside`)."""
    if _function() is None or len(checks) > _MOST:
        return None
    kept: list[int] = []
    for tensor, low, high in checks:
        if tensor is None:
            kept += (0, 4, 0, 0)
            continue
        if type(tensor) is not torch.Tensor or not tensor.is_cpu or not tensor.is_contiguous() or tensor.dtype not in _SIZES:
            return None
        kept += (tensor.numel(), _SIZES[tensor.dtype], low, high)
    try:
        packed = struct.pack(f"={len(kept)}q", *kept)
    except struct.error:  # a bound that is not an int64 (a ctypes array would wrap it)
        return None
    fixed = (ctypes.c_int64 * len(kept)).from_buffer_copy(packed)
    return FixedRanges(fixed, len(checks))


def contiguous_blocks(ids: torch.Tensor, align: int, groups: int) -> list[int] | bool | None:
    """DeepGEMM's contiguous layout checked in one pass (``ids`` int32 [M]: each ``align``-row
    block one group's rows, ids in [-1, groups), followed only by -1): each block's first id, a
    list; False when the layout is not that (the caller's checks then name what is wrong); None
    when it cannot be checked here (as :func:`first_outside`)."""
    functions = _function()
    if functions is None or type(ids) is not torch.Tensor or not ids.is_cpu or ids.dtype != torch.int32 or not ids.is_contiguous() or ids.dim() != 1:
        return None
    count = ids.shape[0] // align if type(align) is int and align > 0 else 0
    firsts = (ctypes.c_int32 * count)()
    buffer, address = getattr(_local, "spec", None) or _spec_buffer()
    try:
        _pack(buffer, 0, ids.data_ptr(), ids.shape[0], align, groups, ctypes.addressof(firsts))
    except struct.error:
        return None
    if _tracing():
        return None
    return False if functions[1](address) else firsts[:]


def pages_within(table: torch.Tensor, lengths: torch.Tensor, most: int, high: int, per_entry: int) -> bool | None:
    """:func:`hal.checks.small_pages_within`'s verdict at any size, in one pass (``table``
    int32/int64 [rows, cols], ``lengths`` int32 [rows] or [rows, k]); None when it cannot be
    given here (as :func:`first_outside`)."""
    functions = _function()
    if (functions is None or type(table) is not torch.Tensor or type(lengths) is not torch.Tensor or not table.is_cpu or not lengths.is_cpu
            or table.dim() != 2 or lengths.dtype != torch.int32 or not table.is_contiguous() or not lengths.is_contiguous()):
        return None
    size = _SIZES.get(table.dtype)
    rows, cols = table.shape
    if size is None or not 1 <= lengths.dim() <= 2 or lengths.shape[0] != rows:
        return None
    buffer, address = getattr(_local, "spec", None) or _spec_buffer()
    try:
        _pack9(buffer, 0, table.data_ptr(), rows, cols, size, lengths.data_ptr(), lengths.shape[1] if lengths.dim() == 2 else 1, most, high, per_entry)
    except struct.error:
        return None
    if _tracing():
        return None
    return bool(functions[2](address))


def _spec_buffer() -> tuple[ctypes.Array, int]:
    """This thread's spec buffer and its address, made on its first use (a call writes the spec
    there, then the C function reads it)."""
    buffer = ctypes.create_string_buffer(40 * _MOST)
    _local.spec = (buffer, ctypes.addressof(buffer))
    return _local.spec


def status() -> str:
    """Where value checks run, in words (``hal backends`` and the docs show it)."""
    if _function() is not None:
        return "compiled (hal/csrc/value_ranges.c)"
    return f"torch ({_why[0] if _why else 'unavailable'})"
