"""The conformance catalogue as pytest tests: ``pytest --pyargs hal.conformance --hal-backend=NAME``."""

from __future__ import annotations

import pytest

from hal.conformance.devices import pick_device
from hal.conformance.runner import execute


def test_case(hal_backend_name, hal_conformance_case):
    result = execute(hal_conformance_case, hal_backend_name, pick_device(hal_backend_name))
    if result.status == "unsupported":
        pytest.skip(result.reason)
    details = "; ".join(f"{m.output} {m.metric}={m.value:.3g} (threshold {m.threshold:g})" for m in result.measurements)
    assert result.passed, f"{result.status}: {result.reason} [{details}]"
