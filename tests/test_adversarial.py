"""The adversarial suite: generated calls with one mutation each, on every CPU-runnable backend,
classified against float64 oracles. CI runs a small budget with a fixed seed plus one fresh seed
per run; ``HAL_ADVERSARIAL_CALLS=20000`` (and ``HAL_ADVERSARIAL_SEED``) make a nightly-sized run."""

from __future__ import annotations

import os
import random
import warnings

import pytest

import hal
from hal.conformance.adversarial import OPERATORS, run, summarise

CALLS = int(os.environ.get("HAL_ADVERSARIAL_CALLS", "400"))
SEEDS = [int(os.environ.get("HAL_ADVERSARIAL_SEED", "0")), random.SystemRandom().randrange(2**31)]


@pytest.mark.parametrize("seed", SEEDS, ids=["fixed-seed", "fresh-seed"])
@pytest.mark.parametrize("backend", ["reference", "opencl", "cpu", "numpy"])
def test_no_defect_in_generated_calls(backend, seed):
    candidate = hal.get_backend(backend)
    if candidate is None or not candidate.available:
        pytest.skip(f"{backend} is not available here" + (f": {candidate.availability().reason}" if candidate else " (pip install -e examples/hal-numpy)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN inputs are the point
        outcomes = run(backend, CALLS, seed)
    counts = summarise(outcomes)
    defects = [f"{o.op} [{o.mutation}]: {o.detail}" for o in outcomes if o.verdict == "defect"]
    assert not defects, f"seed {seed}: {dict(counts)}\n" + "\n".join(defects[:25])
    assert counts["correct"] and counts["typed error"], counts


def test_every_operator_has_valid_and_invalid_mutations():
    for op in OPERATORS.values():
        assert any(m.valid is True for m in op.mutations) and any(m.valid is False for m in op.mutations), op.name
    assert {op.hal_operator for op in OPERATORS.values()} <= set(hal.OPERATORS)


def test_the_suite_finds_a_planted_defect(install_plugins):
    """A backend that silently turns NaN into zero is caught (the suite is not vacuous)."""
    install_plugins({"nan_backend": "nan_backend"})
    outcomes = run("nan_backend", 60, 0, ["gemm_fp8_nt"])
    assert summarise(outcomes)["defect"] > 0
