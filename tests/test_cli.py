"""The `hal` command line: `hal backends` in text and JSON, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from hal.cli import main
from hal.operator import OPERATORS


def run_hal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("hal", path=os.path.dirname(sys.executable)) or shutil.which("hal")
    command = [executable] if executable else [sys.executable, "-m", "hal.cli"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HAL_BACKEND")}
    environment["COLUMNS"] = "240"  # wide enough that no reason wraps inside its table cell
    environment.update(env or {})
    return subprocess.run(command + list(args), capture_output=True, text=True, env=environment, timeout=120)


def test_backends_json_lists_every_backend_with_availability_and_selection():
    result = run_hal("backends", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_name = {b["name"]: b for b in report["backends"]}
    assert {"reference", "cuda", "rocm", "opencl", "cpu"} <= set(by_name)
    assert by_name["reference"]["available"] and set(by_name["reference"]["operators"]) == set(OPERATORS)
    assert not by_name["cuda"]["available"] and "no CUDA device" in by_name["cuda"]["reason"]
    assert set(report["operators"]) == set(OPERATORS)
    for op, spec in OPERATORS.items():
        # auto: the highest-priority available backend that takes CPU tensors and has the operator
        capable = [
            b for b in report["backends"]
            if b["available"] and op in b["operators"] and (b["device_types"] is None or "cpu" in b["device_types"])
        ]
        best = max(capable, key=lambda b: (b["priority"], [-ord(c) for c in b["name"]]))
        assert report["selection"]["cpu"][op]["backend"] == best["name"]
        assert report["selection"]["cpu"][op]["reason"].startswith("auto")


def test_backends_text_shows_reasons_and_selection():
    result = run_hal("backends")
    assert result.returncode == 0, result.stderr
    assert "unavailable: no CUDA device" in result.stdout
    assert "pip install 'unihal[opencl]'" in result.stdout or "opencl" in result.stdout
    assert "Selection for cpu tensors" in result.stdout
    assert "mla_decode" in result.stdout


def test_backends_reports_env_selection_and_chain():
    result = run_hal("backends", "--json", env={"HAL_BACKEND": "cuda,reference", "HAL_BACKEND_MLA_DECODE": "reference"})
    report = json.loads(result.stdout)
    assert report["environment"] == {"HAL_BACKEND": "cuda,reference", "HAL_BACKEND_MLA_DECODE": "reference"}
    assert report["selection"]["cpu"]["mla_decode"]["reason"] == "HAL_BACKEND_MLA_DECODE=reference"
    gemm = report["selection"]["cpu"]["gemm_fp8_nt"]
    assert gemm["backend"] == "reference" and "skipped cuda: unavailable" in gemm["reason"]


def test_backends_shows_selection_errors_instead_of_crashing():
    result = run_hal("backends", "--json", env={"HAL_BACKEND": "cuda"})
    assert result.returncode == 0
    pick = json.loads(result.stdout)["selection"]["cpu"]["mla_decode"]
    assert pick["backend"] is None and pick["error"].startswith("BackendUnavailableError")


def test_unknown_backend_exits_with_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "nonesuch")
    assert main(["backends"]) == 2
    assert "unknown backend 'nonesuch'" in capsys.readouterr().err


def test_broken_plugin_shows_in_the_report(install_plugins, capsys):
    install_plugins({"broken": "broken_import"})
    assert main(["backends", "--json"]) == 0
    broken = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}["broken"]
    assert not broken["available"] and "ImportError" in broken["load_error"]


def test_version():
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0


def test_the_capability_matrix_in_docs_is_current():
    from pathlib import Path

    from hal.capabilities import render

    path = Path(__file__).resolve().parents[1] / "docs" / "capabilities.md"
    assert path.read_text() == render(), "docs/capabilities.md is stale: run hal capabilities --write docs/capabilities.md"
    assert run_hal("capabilities", "--check", str(path)).returncode == 0



def test_piped_output_is_not_folded_to_80_columns(monkeypatch):
    from hal.cli_console import LOG_WIDTH, console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert console().width == LOG_WIDTH  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "123")
    assert console().width == 123
    result = run_hal("backends", env={"COLUMNS": ""})  # piped, no width given: as in a CI log
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) > 80
    assert "unavailable: no CUDA device" in result.stdout
