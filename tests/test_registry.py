"""Discovery through entry points, plugin failure isolation, availability probing."""

from __future__ import annotations

import pytest

import hal
from hal import registry


def test_in_tree_backends_are_discovered_through_entry_points():
    found = hal.list_backends()
    assert {"reference", "cuda", "rocm", "opencl", "cpu"} <= set(found)
    for name in ("reference", "cuda", "rocm", "opencl", "cpu"):
        assert "(unihal " in found[name].source, "in-tree backends register through the package's entry points"


def test_reference_backend_is_available_and_implements_every_operator():
    reference = hal.get_backend("reference")
    assert reference.available
    for op in hal.OPERATORS.values():
        assert reference.implements(op.hook), op.name


def test_broken_plugin_is_reported_not_raised(install_plugins):
    install_plugins({"broken": "broken_import", "recording": "recording_backend"})
    found = hal.list_backends()
    broken = found["broken"]
    assert not broken.available
    assert "ImportError" in broken.load_error and "libvendor.so" in broken.load_error
    assert "broken_import.py" in broken.load_error, "the summary names where it failed"
    assert "plugin failed to load" in broken.availability().reason
    assert found["recording"].available, "other plugins load despite the broken one"
    assert found["reference"].available


def test_raising_availability_probe_marks_backend_unavailable(install_plugins):
    install_plugins({"flaky": "raising_probe"})
    flaky = hal.get_backend("flaky")
    availability = flaky.availability()
    assert not availability.available
    assert "RuntimeError: driver crashed" in availability.reason


def test_plugin_without_info_hook_is_broken(install_plugins):
    install_plugins({"empty": "conftest"})  # a module with no hooks at all
    empty = hal.get_backend("empty")
    assert empty.load_error == "plugin defines no hal_backend_info hook"
    assert not empty.available


def test_register_from_code_and_unregister():
    import types

    from hal.plugin import Availability, BackendInfo, hookimpl

    module = types.ModuleType("inline_backend")
    module.hal_backend_info = hookimpl(lambda: BackendInfo("inline", priority=1))
    module.hal_backend_availability = hookimpl(lambda: Availability(True))
    registry.register(module, "inline")
    try:
        assert hal.get_backend("inline").available
        assert "registered in code" in hal.get_backend("inline").source
    finally:
        registry.unregister("inline")
    assert hal.get_backend("inline") is None


def test_availability_is_probed_once(monkeypatch):
    import types

    from hal.plugin import Availability, BackendInfo, hookimpl

    probes = []
    module = types.ModuleType("counting_backend")
    module.hal_backend_info = hookimpl(lambda: BackendInfo("counting"))
    module.hal_backend_availability = hookimpl(lambda: probes.append(1) or Availability(True))
    registry.register(module, "counting")
    try:
        for _ in range(3):
            assert hal.get_backend("counting").available
        assert len(probes) == 1
    finally:
        registry.unregister("counting")
