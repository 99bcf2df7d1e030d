"""The shared Triton kernels under the adversarial suite (small budget: the interpreter is slow)."""

from __future__ import annotations

import warnings

from hal.conformance.adversarial import run


def test_no_defect_in_generated_calls_on_the_triton_kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcomes = run("cuda", 150, 11)
    defects = [f"{o.op} [{o.mutation}]: {o.detail}" for o in outcomes if o.verdict == "defect"]
    assert not defects, "\n".join(defects[:25])
