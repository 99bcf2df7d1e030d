"""MLA decode follows the float64 oracle through NaN and inf on every CPU-runnable backend: a NaN
or inf that takes part in the math reaches the outputs it affects, keys past a sequence's end
never leak, and an input NaN never produces the empty-row marker."""

from __future__ import annotations

import pytest

import hal
from float64_oracles import mla_nonfinite_mismatches


@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_nonfinite_inputs_follow_the_float64_oracle(backend):
    if not hal.get_backend(backend).available:
        pytest.skip(f"{backend} unavailable: {hal.get_backend(backend).availability().reason}")
    problems = mla_nonfinite_mismatches(backend)
    assert not problems, "\n".join(problems[:20])


def test_a_causal_sequence_shorter_than_s_q_is_valid_and_its_blind_rows_are_empty():
    from float64_oracles import mla_case, run_mla

    case = mla_case([1, 0, 5], 2, 16, True, seed=3)
    out, lse = run_mla("reference", case)
    # sequence 0 has one key: query 0 sees none (out 0, lse +inf), query 1 sees it
    assert (out[0, 0] == 0).all() and (lse[0, :, 0] == float("inf")).all()
    assert (lse[0, :, 1] < float("inf")).all()
    assert (out[1] == 0).all() and (lse[1] == float("inf")).all()


def test_negative_cache_seqlens_are_rejected_by_the_metadata_call():
    import torch

    with pytest.raises(hal.ValueRangeError, match="cache_seqlens"):
        hal.get_mla_metadata(torch.tensor([5, -1], dtype=torch.int32), 16, 1)


@pytest.mark.parametrize("s_q, h_q", [(0, 16), (1, 0)])
@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_zero_query_tokens_or_heads_give_empty_results(backend, s_q, h_q):
    import torch

    if not hal.get_backend(backend).available:
        pytest.skip(f"{backend} unavailable")
    k = torch.randn(4, 64, 1, 576, dtype=torch.bfloat16)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    seqlens = torch.tensor([70, 5], dtype=torch.int32)
    metadata, splits = hal.get_mla_metadata(seqlens, max(s_q * h_q, 1), 1)
    with hal.use_backend(backend):
        out, lse = hal.flash_mla_with_kvcache(torch.randn(2, s_q, h_q, 576, dtype=torch.bfloat16), k, table, seqlens, 512, metadata, splits)
    assert out.shape == (2, s_q, h_q, 512) and lse.shape == (2, h_q, s_q)
