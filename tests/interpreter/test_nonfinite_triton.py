"""The shared Triton MLA kernels follow the float64 oracle through NaN and inf (see
tests/test_nonfinite_mla.py): split and combine included."""

from __future__ import annotations

from float64_oracles import mla_nonfinite_mismatches


def test_triton_mla_follows_the_float64_oracle_through_nonfinite_inputs():
    problems = mla_nonfinite_mismatches("cuda", seeds=range(1))
    assert not problems, "\n".join(problems[:20])
