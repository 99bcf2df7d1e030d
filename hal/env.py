"""Reading unihal's environment variables on the per-call path, cheaply.

Selection and the value checks read a few variables on every operator call (``HAL_BACKEND``,
``HAL_BACKEND_<OP>``, ``HAL_CHECK_VALUES``, ``HAL_REQUIRE_CERTIFIED``), so that a change to
``os.environ`` takes effect at the next call, as users expect. ``os.environ.get`` encodes the
key and decodes the value through several Python frames (~0.7 us each here); on POSIX,
``os.environ`` keeps its contents in a bytes-keyed dict that ``os.environ[...] = ...`` and
``del os.environ[...]`` update, so one dict lookup with a pre-encoded key reads the same value
(~0.1 us). Elsewhere (or if that layout ever changes) this falls back to ``os.environ.get``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

__all__ = ["get", "reader"]

_DATA = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict) and all(isinstance(k, bytes) for k in list(_DATA)[:8])


@functools.lru_cache(maxsize=None)
def _key(name: str) -> bytes:
    return os.fsencode(name)


def get(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, without the per-call encoding work on POSIX."""
    if _FAST:
        value = _DATA.get(_key(name))  # type: ignore[union-attr]
        return default if value is None else os.fsdecode(value)
    return os.environ.get(name, default)


def reader(name: str) -> Callable[[], bytes | str | None]:
    """A function returning the variable's value as stored (bytes on POSIX, else str; None when
    unset), bound to its pre-encoded key (a call costs one dict lookup): a key for state compared,
    or parsed once per value, on every operator call."""
    if _FAST:
        return functools.partial(_DATA.get, _key(name))  # type: ignore[union-attr]
    return functools.partial(os.environ.get, name)
