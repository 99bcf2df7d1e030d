"""Backend discovery: entry points of group ``hal.backends`` loaded into one pluggy manager.

A plugin that fails to import, or whose ``hal_backend_info`` raises, is recorded as a broken
backend with a summary of its traceback; discovery itself never fails. Availability is probed
lazily (it may initialise a driver) and cached for the life of the process.
"""

from __future__ import annotations

import importlib.metadata
import threading
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import pluggy

from hal import hookspecs
from hal.plugin import ENTRY_POINT_GROUP, PROJECT, Availability, BackendInfo

__all__ = ["Backend", "backends", "get_backend", "register", "unregister", "reload", "generation"]

HOOK_NAMES: tuple[str, ...] = tuple(name for name in vars(hookspecs) if name.startswith("hal_"))


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
    _availability_probe: Callable[[], Availability] | None = field(default=None, repr=False)
    _availability: Availability | None = field(default=None, repr=False)

    def availability(self) -> Availability:
        """Probe once and cache; a broken plugin or a raising probe is unavailable with the reason."""
        if self._availability is None:
            if self.load_error is not None:
                self._availability = Availability(False, f"plugin failed to load: {self.load_error}")
            elif self._availability_probe is None:
                self._availability = Availability(False, "plugin has no hal_backend_availability hook")
            else:
                try:
                    result = self._availability_probe()
                    if not isinstance(result, Availability):
                        raise TypeError(f"hal_backend_availability returned {type(result).__name__}, not Availability")
                    self._availability = result
                except Exception as exc:  # a vendor probe must never break discovery
                    self._availability = Availability(False, f"availability probe raised {_summarise(exc)}")
        return self._availability

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
                    backend.info = hookimpl.function()
                except Exception as exc:
                    backend.load_error = f"hal_backend_info raised {_summarise(exc)}"
            elif hook_name == "hal_backend_availability":
                backend._availability_probe = hookimpl.function
            else:
                backend._impls[hook_name] = hookimpl.function
    for backend in found.values():
        if backend.load_error is None and backend.info is None:
            backend.load_error = "plugin defines no hal_backend_info hook"
        if backend.load_error is not None:
            backend._impls.clear()


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
