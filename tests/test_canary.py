"""A backend is proven before it is chosen: the canary runs its operators in a child process, a
crash, hang or wrong number makes it unavailable with the reason, the user's process survives,
and the verdict is cached on disk per runtime identity."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hal
from hal import canary, registry

needs_opencl = pytest.mark.skipif(
    importlib.util.find_spec("pyopencl") is None or not Path("/etc/OpenCL/vendors").is_dir(),
    reason="needs pyopencl and an OpenCL driver (scripts/install.sh installs both: unihal[opencl] and Debian's pocl-opencl-icd)",
)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(canary.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("wrong", "wrong or failed results: per_token_cast_to_fp8/"),
        ("abort", "canary process killed by SIGABRT"),
    ],
)
def test_a_backend_that_fails_its_canary_is_unavailable_and_never_selected(mode, reason, install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv("HAL_TEST_CANARY_MODE", mode)
    install_plugins({"canaried": "canaried"})
    backend = hal.get_backend("canaried")
    availability = backend.availability()
    assert not availability.available and reason in availability.reason
    assert "failed its canary" in availability.reason
    # Auto-selection passes over it (it has the highest priority); this process never ran it.
    x = torch.randn(4, 256)
    assert hal.select("per_token_cast_to_fp8", "cpu").backend.name != "canaried"
    hal.per_token_cast_to_fp8(x)
    import canaried

    assert canaried.CALLS == []


def test_a_hanging_canary_is_bounded(install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv("HAL_TEST_CANARY_MODE", "hang")
    monkeypatch.setenv(canary.ENV_TIMEOUT, "3")
    install_plugins({"canaried": "canaried"})
    availability = hal.get_backend("canaried").availability()
    assert not availability.available and "did not finish within 3 s" in availability.reason


def test_a_passing_canary_makes_the_backend_available_and_its_verdict_is_cached(install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv("HAL_TEST_CANARY_MODE", "correct")
    install_plugins({"canaried": "canaried"})
    backend = hal.get_backend("canaried")
    assert backend.available, backend.availability().reason
    first = backend.verdict
    assert first.passed and first.cases and all(c.endswith(": pass") for c in first.cases)
    assert hal.select("per_token_cast_to_fp8", "cpu").backend.name == "canaried"
    entries = list((fresh_cache / "canary").glob("canaried-*.json"))
    assert len(entries) == 1

    registry.reload()  # a new process would read the same file: no second child
    again = hal.get_backend("canaried")
    assert again.available and again.verdict.checked_at == first.checked_at

    monkeypatch.setenv("HAL_TEST_CANARY_MODE", "wrong")  # the runtime changed: its key changes, it is proven again
    registry.reload()
    changed = hal.get_backend("canaried")
    assert not changed.available and changed.verdict.checked_at > first.checked_at


def test_canaries_can_be_disabled_for_debugging(install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv("HAL_TEST_CANARY_MODE", "wrong")
    monkeypatch.setenv(canary.ENV_ENABLED, "0")
    install_plugins({"canaried": "canaried"})
    assert hal.get_backend("canaried").available and hal.get_backend("canaried").verdict is None


def test_a_bad_canary_timeout_is_reported_not_raised(install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv(canary.ENV_TIMEOUT, "inf")
    install_plugins({"canaried": "canaried"})
    availability = hal.get_backend("canaried").availability()
    assert not availability.available and canary.ENV_TIMEOUT in availability.reason


@needs_opencl
def test_opencl_passes_its_canary_on_this_machine(fresh_cache):
    opencl = hal.get_backend("opencl")
    assert opencl.available, opencl.availability().reason
    assert opencl.verdict.passed and len(opencl.verdict.cases) >= 20
    assert "Portable Computing Language" in opencl.availability().device or opencl.availability().device


def _fake_icd(tmp_path: Path, body: str) -> Path:
    """An OpenCL driver (ICD) built from C: what the loader dlopens when it enumerates platforms."""
    source = tmp_path / "fake_icd.c"
    source.write_text(textwrap.dedent(body))
    library = tmp_path / "libfake_icd.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    (vendors / "fake.icd").write_text(str(library) + "\n")
    return vendors


@needs_opencl
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a fake OpenCL driver")
def test_an_opencl_driver_that_segfaults_leaves_the_process_alive(tmp_path, fresh_cache, monkeypatch):
    vendors = _fake_icd(
        tmp_path,
        """
        #include <signal.h>
        __attribute__((constructor)) static void crash_on_load(void) { raise(SIGSEGV); }
        """,
    )
    monkeypatch.setenv("OCL_ICD_VENDORS", str(vendors))
    opencl = hal.get_backend("opencl")
    availability = opencl.availability()
    assert not availability.available
    assert "killed by SIGSEGV" in availability.reason
    # The process is alive, and CPU operators run on another backend.
    assert hal.select("gemm_fp8_nt", "cpu").backend.name != "opencl"
    x = torch.randn(8, 256)
    values, scales = hal.per_token_cast_to_fp8(x)
    assert values.shape == x.shape and scales.shape == (8, 2)


@needs_opencl
def test_an_opencl_platform_that_is_missing_is_unavailable_with_the_reason(tmp_path, fresh_cache, monkeypatch):
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    (vendors / "ghost.icd").write_text("/nonexistent/libghost-opencl.so\n")
    monkeypatch.setenv("OCL_ICD_VENDORS", str(vendors))
    availability = hal.get_backend("opencl").availability()
    assert not availability.available and "no OpenCL" in availability.reason


def test_hal_backends_reports_a_failed_canary(install_plugins, fresh_cache, monkeypatch):
    monkeypatch.setenv("HAL_TEST_CANARY_MODE", "abort")
    install_plugins({"canaried": "canaried"})
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    entry = next(b for b in report["backends"] if b["name"] == "canaried")
    assert not entry["available"] and "SIGABRT" in entry["reason"] and entry["canary"]["passed"] is False
