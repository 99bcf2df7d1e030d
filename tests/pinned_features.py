"""Which contract features a backend's pins leave out, and the check that a conformance run
skipped cases only for those (tests of the Triton and OpenCL backends share it)."""

from __future__ import annotations

import re

import hal
from hal.conformance.catalogue import select_cases
from hal.operator import OPERATORS

# Features each backend leaves out on purpose, with the reason in its plugin; widen only for a
# kernel that is really missing, never to let a failure through.
PINNED_OUT = {
    "cuda": {"model1_fp8", "row_segments"},
    "rocm": {"model1_fp8", "row_segments"},
    "opencl": set(),
}


def lacking(backend_name: str) -> set[str]:
    """The features of every operator the backend implements that it does not declare."""
    backend = hal.registry.backends()[backend_name]
    return {f.name for op in OPERATORS.values() if backend.implements(op.hook) for f in op.features if f.name not in backend.features(op)}


def assert_passed_but_pinned(backend_name: str, pytest_stdout: str) -> None:
    """Every quick case of a ``pytest --pyargs hal.conformance --hal-backend=NAME`` run passed,
    except cases skipped for a feature the backend's pins leave out (each skip names it)."""
    missing = lacking(backend_name)
    assert missing <= PINNED_OUT[backend_name], missing
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error)", pytest_stdout))
    skips = re.findall(r"SKIPPED \[(\d+)\].*?not the feature\(s\) this call uses: (\w+)", pytest_stdout)
    assert all(feature in missing for _, feature in skips), skips
    assert set(counts) <= {"passed", "skipped"}, pytest_stdout[-3000:]
    assert counts.get("skipped", 0) == sum(int(n) for n, _ in skips), pytest_stdout[-3000:]
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(select_cases(quick=True)), pytest_stdout[-3000:]
