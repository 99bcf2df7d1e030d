"""Argument layouts whose structural checks passed, found again in about a microsecond.

Engines call each operator with the same few layouts step after step, so an operator checks a
layout (dtypes, shapes, strides, devices) once and remembers the verdict, keyed by
:func:`hal.checks.signature`. Building that key reads five attributes of every tensor and hashes
them: 3-4 us for a call of six tensors, which is most of a call's host overhead. :class:`Layouts`
keeps the same memo and finds a remembered layout faster: the call's scalars (the operator's name,
flags, ints: hashed as they are) pick a short list of remembered layouts, and each is compared
with the call's tensors by torch's compiled tensor guard (``torch._C._dynamo.guards.TensorGuards``,
what ``torch.compile`` runs before every compiled call: exact type, dispatch keys, dtype, device,
requires_grad, sizes and strides, about 0.1 us a tensor). A guard that passes means the tensors
have the signature it was built from; anything it cannot vouch for (torch without it, a subclass,
a new layout) takes the signature path, so the guard only ever makes a lookup faster, never
different.

Values are remembered, never tensors: a guard holds sizes and strides, not references.

An int that an engine changes every step (the longest context, the expected rows per group) would
make every step a new layout, checked again. Callers key such an int by :func:`int_bucket`: which
of the bounds its checks compare it with it reaches, not its value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hal.checks import _SIGNABLE, INT_LIMIT, IntBucket, signature

__all__ = ["Layouts", "int_bucket"]

try:  # private to torch (stable since 2.0); without it every lookup takes the signature path
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except Exception:  # noqa: BLE001 - any failure to import means: not available
    _TensorGuards = None

_Tensor = torch.Tensor
_TENSOR = (_Tensor, None)  # a tensor's place in a call's pattern
_NONE = (type(None), None)
_PER_PATTERN = 8  # guards tried per pattern of scalars (a failing guard costs 0.1-0.5 us)


_BUCKETS = tuple(IntBucket(n) for n in range(8))


def int_bucket(value: object, *bounds: int) -> object:
    """``value``'s part in a layout key when it is a per-step int: how many of ``bounds`` (ascending)
    it reaches (``value >= bound``), so that 4097 and 4098 share a layout. The caller lists every
    bound at which its structural checks, or what it derives from them, change (``expected_m``:
    ``(1,)``; ``max_seqlen_k``, 0 meaning off: ``(0, 1)``; at most 6 bounds); the bound every
    :func:`hal.checks.expect_int` has, :data:`hal.checks.INT_LIMIT`, is counted here. Anything but
    an int (a bool, a float, None, a tensor) is returned as it is, keyed as such, so the checks see
    it and name it."""
    if type(value) is not int:
        return value
    reached = int(value >= INT_LIMIT)
    for bound in bounds:
        reached += value >= bound
    return _BUCKETS[reached]  # a scalar of its own type: keyed as cheaply as an int


def _pattern(values: tuple[Any, ...]) -> tuple[tuple[Any, ...] | None, list[torch.Tensor]]:
    """The call's scalars in place (typed: 512.0 and True must not pass as 512 and 1) with a mark
    for each plain tensor, and the tensors in order; (None, []) when a value is neither."""
    parts = []
    tensors = []
    for value in values:
        if value is None:  # optional arguments, often several a call
            parts.append(_NONE)
            continue
        kind = type(value)
        if kind is _Tensor:
            if value.is_nested:  # a guard's check would read its strides, which abort the process: the checks name it
                return None, tensors
            tensors.append(value)
            parts.append(_TENSOR)
        elif kind in _SIGNABLE:
            parts.append((kind, value))
        elif kind is tuple and all(type(item) in _SIGNABLE for item in value):  # DeepGEMM's recipes
            parts.append((tuple, tuple((type(item), item) for item in value)))
        else:  # a subclass, a list, a tuple holding a tensor: the signature path
            return None, tensors
    return tuple(parts), tensors


def _repeats(pattern: tuple[Any, ...], tensors: list[torch.Tensor]) -> tuple[tuple[Any, ...], tuple[int, ...], tuple[tuple[int, int], ...]] | None:
    """How a call gives a tensor more than once (``d`` given as ``c``), which a guard never passes
    (it is given the same tensor twice): ``(pattern with each repeat marked by the first place of
    its tensor, the places of the distinct tensors, (repeat place, first place) pairs)``; None when
    every tensor is distinct."""
    if len({id(tensor) for tensor in tensors}) == len(tensors):
        return None
    parts: list[Any] = []
    keep: list[int] = []
    same: list[tuple[int, int]] = []
    places = iter(range(len(tensors)))
    for part in pattern:
        if part is not _TENSOR:
            parts.append(part)
            continue
        place = next(places)
        for position, first in enumerate(keep):
            if tensors[first] is tensors[place]:
                parts.append((_Tensor, position))
                same.append((place, first))
                break
        else:
            keep.append(place)
            parts.append(_TENSOR)
    return tuple(parts), tuple(keep), tuple(same)


class Layouts:
    """What an operator's structural checks derived, per argument layout.

    ``lookup(values)`` gives ``(key, value)``: the values' :func:`hal.checks.signature` (None when
    it cannot describe them, or ``values`` is None: check every call) and what :meth:`remember`
    stored under it (None when the layout was not checked before). After the checks pass,
    ``remember(values, key, value)`` with the key lookup gave (``value`` must not be None; a None
    key remembers nothing). ``recall(values, check, *args)`` does both when the checks are one
    function whose result is the value. ``limit`` layouts at most: a workload of ever-changing
    shapes starts over.
    """

    __slots__ = ("_known", "_guarded", "_repeats", "_limit")

    def __init__(self, limit: int = 1024) -> None:
        self._known: dict[tuple[Any, ...], Any] = {}
        self._guarded: dict[tuple[Any, ...], list[tuple[Any, tuple[Any, ...], Any]]] = {}
        self._repeats: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...], tuple[tuple[int, int], ...]]] = {}  # see _repeats
        self._limit = limit

    def lookup(self, values: tuple[Any, ...] | None) -> tuple[tuple[Any, ...] | None, Any]:
        if values is None:  # arguments the caller could not even lay out (a non-tuple operand)
            return None, None
        pattern, tensors = _pattern(values)
        if pattern is not None:
            for guard, key, value in self._guarded.get(pattern, ()):
                if guard.check(*tensors):
                    return key, value
            repeats = self._repeats.get(pattern)  # a call that gave a tensor twice, as this one may
            if repeats is not None:
                shared, keep, same = repeats
                if all(tensors[place] is tensors[first] for place, first in same):
                    distinct = [tensors[place] for place in keep]
                    for guard, key, value in self._guarded.get(shared, ()):
                        if guard.check(*distinct):
                            return key, value
        key = signature(*values)
        if key is None:
            return None, None
        value = self._known.get(key)
        if value is not None and pattern is not None:  # known, but not guarded (pushed out of its list)
            self._guard(pattern, tensors, key, value)
        return key, value

    def recall(self, values: tuple[Any, ...] | None, check: Callable[..., Any], *args: Any) -> Any:
        """What ``check(*args)`` returned for this layout before, else its result now (remembered)."""
        key, value = self.lookup(values)
        if value is None:
            value = check(*args)
            self.remember(values, key, value)
        return value

    def remember(self, values: tuple[Any, ...] | None, key: tuple[Any, ...] | None, value: Any = True) -> None:
        if key is None or value is None:
            return
        if len(self._known) >= self._limit:
            self.clear()
        self._known[key] = value
        pattern, tensors = _pattern(values)
        if pattern is not None:
            self._guard(pattern, tensors, key, value)

    def clear(self) -> None:
        self._known.clear()
        self._guarded.clear()
        self._repeats.clear()

    def __len__(self) -> int:
        return len(self._known)

    def _guard(self, pattern: tuple[Any, ...], tensors: list[torch.Tensor], key: tuple[Any, ...], value: Any) -> None:
        if _TensorGuards is None:
            return
        repeats = _repeats(pattern, tensors)
        if repeats is not None:  # guarded with each tensor once, under the pattern that marks the repeats
            self._repeats[pattern] = repeats
            pattern, tensors = repeats[0], [tensors[place] for place in repeats[1]]
        try:
            guard = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        except Exception:  # noqa: BLE001 - a torch that builds guards differently: the signature path serves
            return
        # newest first; a new list replaces the old, so a lookup in another thread never sees one changing
        self._guarded[pattern] = [(guard, key, value), *self._guarded.get(pattern, ())[: _PER_PATTERN - 1]]
