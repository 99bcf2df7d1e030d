"""Shared fixtures: every test starts with no selection variables set and a fresh registry."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hal import registry, selection
from hal.operator import OPERATORS

PLUGINS_DIR = Path(__file__).parent / "plugins"

# Canary verdicts go to a cache of this test session (child processes inherit it): every run
# proves its backends afresh instead of trusting a verdict from the developer's cache.
os.environ["HAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="hal-test-cache-")


@pytest.fixture(autouse=True)
def clean_selection(monkeypatch: pytest.MonkeyPatch):
    for var in [selection.ENV_BACKEND] + [op.env_var for op in OPERATORS.values()]:
        monkeypatch.delenv(var, raising=False)
    registry.reload()
    yield
    registry.reload()


@pytest.fixture
def install_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install test plugin modules from tests/plugins under the 'hal.backends' entry points.

    Writes a real ``*.dist-info`` with an ``entry_points.txt`` on sys.path, so discovery goes
    through importlib.metadata exactly as for a pip-installed vendor package.
    """

    def install(entries: dict[str, str], dist: str = "hal-test-plugins") -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = ["[hal.backends]"] + [f"{name} = {module}" for name, module in entries.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.syspath_prepend(str(PLUGINS_DIR))
        # Child processes (canaries, isolated conformance workers) discover the same plugins.
        paths = [str(tmp_path), str(PLUGINS_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))
        registry.reload()

    return install


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch):
    """The recording backend's call log, emptied before the test."""
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    import recording_backend  # noqa: PLC0415  (importable once tests/plugins is on sys.path)

    recording_backend.CALLS.clear()
    return recording_backend.CALLS
