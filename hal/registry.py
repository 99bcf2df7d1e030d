"""Backend discovery: entry points of group ``hal.backends`` loaded into one pluggy manager.

A plugin that fails to import, whose ``hal_backend_info`` raises or returns something other
than a :class:`BackendInfo`, is recorded as a broken backend with the reason; discovery itself
never fails. Availability is probed lazily (it may initialise a driver), bounded in time
(``HAL_PROBE_TIMEOUT_S``) and cached for the life of the process; a backend that implements
``hal_backend_canary_key`` must also pass its canary (:mod:`hal.canary`, a child process) before
it is available.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import pluggy

from hal import canary, hookspecs
from hal.operator import Operator
from hal.plugin import ENTRY_POINT_GROUP, NOT_IMPLEMENTED_MARK, PROJECT, Availability, BackendInfo

__all__ = ["Backend", "backends", "get_backend", "register", "unregister", "reload", "generation"]

HOOK_NAMES: tuple[str, ...] = tuple(name for name in vars(hookspecs) if name.startswith("hal_"))
ENV_PROBE_TIMEOUT = "HAL_PROBE_TIMEOUT_S"
DEFAULT_PROBE_TIMEOUT_S = 30.0

log = logging.getLogger("hal")


def probe_timeout() -> float:
    """Seconds an in-process availability probe may take (``HAL_PROBE_TIMEOUT_S``, default 30)."""
    text = os.environ.get(ENV_PROBE_TIMEOUT, "").strip()
    try:
        value = float(text) if text else DEFAULT_PROBE_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not (0 < value <= 3600):
        log.warning("hal: ignoring %s=%r (want seconds in (0, 3600]); using %g", ENV_PROBE_TIMEOUT, text, DEFAULT_PROBE_TIMEOUT_S)
        value = DEFAULT_PROBE_TIMEOUT_S
    return value


def _bounded(call: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Run ``call`` in a daemon thread: ``(True, result)``, ``(True, exception)`` or ``(False, None)`` on timeout.

    A hung vendor probe is abandoned in its thread; it cannot be killed, but it no longer blocks."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # noqa: BLE001 - reported as the backend's reason
            box.append(exc)

    worker = threading.Thread(target=target, daemon=True, name="hal-availability-probe")
    worker.start()
    worker.join(timeout)
    return (True, box[0]) if box else (False, None)


def _summarise(exc: BaseException) -> str:
    """The exception and the innermost frame that raised it, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass
class Backend:
    """A discovered backend plugin.

    Attributes:
        name: entry-point name, the name users select (``HAL_BACKEND=name``).
        source: ``"module (distribution version)"`` it was loaded from.
        info: its static description, or None when the plugin is broken.
        load_error: traceback summary when the plugin could not be loaded.
    """

    name: str
    source: str
    info: BackendInfo | None = None
    load_error: str | None = None
    _impls: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)
    _todo: set[str] = field(default_factory=set, repr=False)
    _availability_probe: Callable[[], Availability] | None = field(default=None, repr=False)
    _canary_key: Callable[[], str] | None = field(default=None, repr=False)
    _availability: Availability | None = field(default=None, repr=False)
    _probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    verdict: canary.Verdict | None = field(default=None, repr=False)

    def availability(self) -> Availability:
        """Probe once and cache; a broken plugin, a raising, hanging or ill-typed probe, or a
        failed canary makes the backend unavailable with the reason."""
        with self._probe_lock:
            if self._availability is None:
                self._availability = self._probe()
            return self._availability

    def _probe(self) -> Availability:
        if self.load_error is not None:
            return Availability(False, f"plugin failed to load: {self.load_error}")
        if self._availability_probe is None:
            return Availability(False, "plugin has no hal_backend_availability hook")
        timeout = probe_timeout()
        finished, result = _bounded(self._availability_probe, timeout)
        if not finished:
            return Availability(False, f"availability probe did not answer within {timeout:g} s ({ENV_PROBE_TIMEOUT})")
        if isinstance(result, BaseException):
            return Availability(False, f"availability probe raised {_summarise(result)}")
        if not isinstance(result, Availability):
            return Availability(False, f"hal_backend_availability returned {type(result).__name__}, not Availability (plugin bug)")
        if not result.available or self._canary_key is None or canary.proving(self.name) or not canary.canaries_enabled():
            return result
        return self._prove(result)

    def _prove(self, probed: Availability) -> Availability:
        finished, key = _bounded(self._canary_key, probe_timeout())
        if not finished or isinstance(key, BaseException) or not isinstance(key, str):
            why = "did not answer" if not finished else (_summarise(key) if isinstance(key, BaseException) else f"returned {type(key).__name__}, not str")
            return Availability(False, f"hal_backend_canary_key {why} (plugin bug)")
        try:
            self.verdict = canary.verdict(self.name, self.source, key, log=log.info)
        except Exception as exc:  # a bad HAL_CANARY_TIMEOUT_S or an unwritable cache: say so, never crash
            return Availability(False, f"canary could not run: {_summarise(exc)}")
        if not self.verdict.passed:
            return Availability(False, f"failed its canary (a child process; verdict cached): {self.verdict.reason}", device=self.verdict.device)
        return Availability(True, device=self.verdict.device or probed.device, simulated=probed.simulated)

    @property
    def available(self) -> bool:
        return self.availability().available

    @property
    def priority(self) -> int:
        return self.info.priority if self.info else -1

    def implements(self, hook: str) -> bool:
        return hook in self._impls

    def impl(self, hook: str) -> Callable[..., Any] | None:
        """The backend's function for ``hook``, or None when it does not implement it."""
        return self._impls.get(hook)

    def implemented_hooks(self) -> list[str]:
        return sorted(self._impls)

    def planned_hooks(self) -> list[str]:
        """Hooks the plugin declares but marks ``@not_implemented_yet`` (a fresh ``hal new-backend``)."""
        return sorted(self._todo)

    def features(self, op: Operator) -> frozenset[str]:
        """The optional features of ``op``'s contract this backend serves (see :mod:`hal.operator`).

        Declared names that ``op`` does not know (a plugin written for a newer unihal) are ignored."""
        info = self.info
        if info is None:
            return frozenset()
        declared = info.features.get(op.name)
        if declared is not None:
            return frozenset(declared) & frozenset(f.name for f in op.features)
        return op.features_up_to(info.contract_versions.get(op.name, 1))

    def accepts_device(self, device_type: str) -> bool:
        types = self.info.device_types if self.info else ()
        return types is None or device_type in types


_lock = threading.RLock()
_backends: dict[str, Backend] | None = None
_extra_plugins: dict[str, ModuleType | object] = {}
_generation = 0


def _make_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _info_problem(info: object) -> str | None:
    """Why a ``hal_backend_info`` result breaks the contract, or None when it is a valid BackendInfo."""
    if not isinstance(info, BackendInfo):
        return f"returned {type(info).__name__}, not BackendInfo"
    if isinstance(info.priority, bool) or not isinstance(info.priority, int):
        return f"returned priority {info.priority!r}, not an int"
    types = info.device_types
    if types is not None and (not isinstance(types, tuple) or not all(isinstance(t, str) for t in types)):
        return f"returned device_types {types!r}, not a tuple of torch device type names or None"
    features = info.features
    if not isinstance(features, Mapping) or not all(
        isinstance(op, str) and isinstance(names, (tuple, list, frozenset, set)) and all(isinstance(n, str) for n in names)
        for op, names in features.items()
    ):
        return f"returned features {features!r}, not a mapping of operator name to a tuple of feature names"
    versions = info.contract_versions
    if not isinstance(versions, Mapping) or not all(
        isinstance(op, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for op, v in versions.items()
    ):
        return f"returned contract_versions {versions!r}, not a mapping of operator name to a version >= 1"
    return None


def _load_entry_points(manager: pluggy.PluginManager, found: dict[str, Backend]) -> None:
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in found:
            continue  # the first distribution on sys.path wins, as with any entry point
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        backend = Backend(name=ep.name, source=f"{ep.value} ({dist})")
        found[ep.name] = backend
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:
            backend.load_error = _summarise(exc)


def _collect(manager: pluggy.PluginManager, found: dict[str, Backend]) -> None:
    """Fill each backend's info, probe and per-hook implementations from the manager."""
    for hook_name in HOOK_NAMES:
        caller = getattr(manager.hook, hook_name)
        for hookimpl in caller.get_hookimpls():
            backend = found.get(hookimpl.plugin_name)
            if backend is None:
                continue
            if hook_name == "hal_backend_info":
                try:
                    info = hookimpl.function()
                except Exception as exc:
                    backend.load_error = f"hal_backend_info raised {_summarise(exc)}"
                    continue
                problem = _info_problem(info)
                if problem is None:
                    backend.info = info
                else:
                    backend.load_error = f"hal_backend_info {problem} (plugin bug)"
            elif hook_name == "hal_backend_availability":
                backend._availability_probe = hookimpl.function
            elif hook_name == "hal_backend_canary_key":
                backend._canary_key = hookimpl.function
            elif getattr(hookimpl.function, NOT_IMPLEMENTED_MARK, False):
                backend._todo.add(hook_name)
            else:
                backend._impls[hook_name] = hookimpl.function
    for backend in found.values():
        if backend.load_error is None and backend.info is None:
            backend.load_error = "plugin defines no hal_backend_info hook"
        if backend.load_error is not None:
            backend._impls.clear()
            backend._todo.clear()


def _discover() -> dict[str, Backend]:
    manager = _make_manager()
    found: dict[str, Backend] = {}
    for name, plugin in _extra_plugins.items():
        found[name] = Backend(name=name, source=f"{getattr(plugin, '__name__', type(plugin).__name__)} (registered in code)")
        try:
            manager.register(plugin, name=name)
        except Exception as exc:
            found[name].load_error = _summarise(exc)
    _load_entry_points(manager, found)
    _collect(manager, found)
    return found


def backends() -> dict[str, Backend]:
    """Every discovered backend by name (loaded on first use)."""
    global _backends
    with _lock:
        if _backends is None:
            _backends = _discover()
        return _backends


def get_backend(name: str) -> Backend | None:
    return backends().get(name)


def generation() -> int:
    """Changes whenever the set of backends is rebuilt; selection caches key on it."""
    return _generation


def reload() -> None:
    """Forget every backend and rediscover on next use (after installing a plugin at run time)."""
    global _backends, _generation
    with _lock:
        _backends = None
        _generation += 1


def register(plugin: ModuleType | object, name: str) -> None:
    """Register a backend from code rather than through an entry point (tests, notebooks).

    It takes precedence over an entry point of the same name.
    """
    with _lock:
        _extra_plugins[name] = plugin
        reload()


def unregister(name: str) -> None:
    """Remove a backend registered with :func:`register`."""
    with _lock:
        _extra_plugins.pop(name, None)
        reload()
