"""The ROCm backend: FP8 fnuz conversion bit-exact against torch, LDS-respecting tuning tables,
availability, and the shared kernels certified in simulation for each known gfx arch."""

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
from pinned_features import assert_passed_but_pinned
from hal.backends.rocm.archs import ARCHS, arch_of, gemm_lds_bytes, tuning_for
from hal.backends.rocm.fp8 import e4m3fn_to_e4m3fnuz
from hal.backends.triton.tuning import FP8_E4M3FNUZ
from hal.conformance.catalogue import select_cases

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
ALL_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)


def test_fnuz_conversion_is_exact_for_all_256_codes():
    converted, scales = e4m3fn_to_e4m3fnuz(ALL_CODES, torch.ones(1))
    assert float(scales) == 2.0
    original = ALL_CODES.float()
    value = converted.float() * 2.0
    nan = torch.isnan(original)
    assert torch.equal(torch.isnan(value), nan)
    assert torch.equal(value[~nan], original[~nan])  # every finite value, those above 240 included
    assert (original[~nan].abs() > 240).sum() > 0
    # torch's own conversion of the halved values gives the same codes.
    halved = (original[~nan] / 2).to(torch.float8_e4m3fnuz).view(torch.uint8)
    assert torch.equal(converted.view(torch.uint8)[~nan], halved)


def test_fnuz_special_codes():
    codes = torch.tensor([0x00, 0x80, 0x7F, 0xFF, 0x7E, 0xFE], dtype=torch.uint8).view(torch.float8_e4m3fn)
    converted, _ = e4m3fn_to_e4m3fnuz(codes, torch.ones(1))
    assert converted.view(torch.uint8).tolist() == [0x00, 0x00, 0x80, 0x80, 0x7E, 0xFE]
    assert converted.float()[4] * 2 == 448.0


def test_fnuz_conversion_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        e4m3fn_to_e4m3fnuz(torch.zeros(2), torch.ones(1))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tuning_tables_fit_the_lds(arch):
    info = ARCHS[arch]
    tuning = tuning_for(info)
    for m in (1, 16, 17, 64, 4096):
        for n, k in ((128, 128), (7168, 2048), (24576, 1536)):
            config = tuning.gemm(m, n, k)
            assert 128 % config.block_n == 0 and 128 % config.block_m == 0
            assert gemm_lds_bytes(config, 1 if info.fp8_dot else 2) <= info.lds_bytes
    assert (tuning.fp8_format == FP8_E4M3FNUZ) == (arch == "gfx942")
    assert tuning.mla.num_stages * 64 * 576 * 2 <= info.lds_bytes or tuning.mla.num_stages == 1


def test_arch_names_are_parsed():
    assert arch_of("gfx942:sramecc+:xnack-") == "gfx942"


@pytest.mark.skipif(torch.version.hip is not None, reason="describes a machine without ROCm")
def test_without_amd_gpu_the_backend_says_how_to_simulate():
    rocm = hal.get_backend("rocm")
    assert not rocm.available
    assert "HAL_ROCM_SIMULATE_ARCH=gfx942" in rocm.availability().reason
    assert all(rocm.implements(op.hook) for op in hal.OPERATORS.values())


def run(args: list[str], arch: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    env["TRITON_INTERPRET"] = "1"
    if arch:
        env["HAL_ROCM_SIMULATE_ARCH"] = arch
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


def test_simulation_needs_a_known_arch():
    for arch, expected in ((None, "set HAL_ROCM_SIMULATE_ARCH"), ("gfx1234", "not a known arch")):
        result = run(["-m", "hal.cli", "backends", "--json"], arch)
        rocm = next(b for b in json.loads(result.stdout)["backends"] if b["name"] == "rocm")
        assert not rocm["available"] and expected in rocm["reason"]


@pytest.mark.parametrize("arch", ["gfx942", "gfx950"])
def test_quick_conformance_in_simulation(arch):
    report = json.loads(run(["-m", "hal.cli", "backends", "--json"], arch).stdout)
    rocm = next(b for b in report["backends"] if b["name"] == "rocm")
    assert rocm["available"] and rocm["simulated"] and arch in rocm["device"] and "not verified on AMD hardware" in rocm["device"]
    result = run(["-m", "pytest", "--pyargs", "hal.conformance", "--hal-backend=rocm", "-q", "-p", "no:cacheprovider"], arch)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # The Triton kernels cover every operator and every feature the backend declares: every quick
    # case passes, and a case is skipped only for a feature its contract pins leave out (named).
    assert_passed_but_pinned("rocm", result.stdout)
