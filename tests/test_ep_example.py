"""The EP example under torchrun (it checks itself against a one-process reference and must fail
when a backend's local EP kernel is wrong), and the multi-process EP benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hal.ep.bench import CASES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ep_moe.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
PLUGINS_DIR = Path(__file__).parent / "plugins"


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(EXAMPLE), *args],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=clean | (env or {}),
    )


@pytest.mark.parametrize("transport", ["shm", "torch"])
@pytest.mark.parametrize("mode", [[], ["--low-latency"]], ids=["normal", "low-latency"])
def test_example_matches_the_single_process_reference(mode, transport):
    result = torchrun(*mode, env={"HAL_EP_TRANSPORT": transport})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count(" ok") == 2 and "MISMATCH" not in result.stdout


def test_example_exits_non_zero_when_a_backend_unpacks_wrongly(install_plugins, tmp_path):
    install_plugins({"wrong_ep": "wrong_ep"})  # its ep_unpack drops the last token of every expert

    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(PLUGINS_DIR)]), "HAL_BACKEND_EP_UNPACK": "wrong_ep"}
    result = torchrun("--low-latency", env=env)
    assert result.returncode != 0 and "MISMATCH" in result.stdout, result.stdout + result.stderr[-3000:]


def test_benchmark_reports_bytes_per_second_and_the_ratio_to_all_to_all():
    result = subprocess.run(
        [sys.executable, "-m", "hal.ep.bench", "--world-size", "2", "--tokens", "16", "--hidden", "256", "--topk", "2",
         "--experts-per-rank", "2", "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert [s["case"] for s in summary] == list(CASES)
    for case in summary:
        assert case["world_size"] == 2 and case["bytes_per_rank"] > 0 and case["bytes_per_s_per_rank"] > 0
        assert case["median_s"] > 0 and case["all_to_all_median_s"] > 0
        assert case["ratio_to_all_to_all"] == pytest.approx(case["all_to_all_median_s"] / case["median_s"])
