"""The CUDA backend: its availability story, and its Triton kernels certified in the interpreter.

Without a GPU the kernels run in Triton's CPU interpreter in child processes (TRITON_INTERPRET
must be set before Triton is imported), exactly as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hal
from hal.conformance.catalogue import select_cases
from pinned_features import assert_passed_but_pinned

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")


def run(args: list[str], interpret: bool, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_BACKEND") and k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@no_gpu
def test_without_gpu_the_backend_says_how_to_simulate():
    cuda = hal.get_backend("cuda")
    assert not cuda.available
    assert "no CUDA device" in cuda.availability().reason and "TRITON_INTERPRET=1" in cuda.availability().reason
    assert all(cuda.implements(op.hook) for op in hal.OPERATORS.values())


@no_gpu
def test_simulation_is_labelled_and_never_auto_selected():
    result = run(["-m", "hal.cli", "backends", "--json"], interpret=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cuda = next(b for b in report["backends"] if b["name"] == "cuda")
    assert cuda["available"] and cuda["simulated"] and "interpreter" in cuda["device"]
    assert cuda["priority"] < 0
    assert all(pick["backend"] != "cuda" for pick in report["selection"]["cpu"].values())


def test_quick_conformance_in_the_interpreter():
    result = run(["-m", "pytest", "--pyargs", "hal.conformance", "--hal-backend=cuda", "-q", "-p", "no:cacheprovider"], interpret=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # The Triton kernels cover every operator and every feature the backend declares: every quick
    # case passes, and a case is skipped only for a feature its contract pins leave out (named).
    assert_passed_but_pinned("cuda", result.stdout)


def test_kernel_numerics_in_the_interpreter():
    result = run(["-m", "pytest", "tests/interpreter", "-q", "-p", "no:cacheprovider"], interpret=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
