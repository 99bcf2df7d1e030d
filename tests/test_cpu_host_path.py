"""The host path on CPU tensors: value checks that cost one reduction and can be switched off,
and a schedule computed only as far as the selected backend reads it."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.checks import expect_in_range
from hal.ops.mla_schedule import schedule_mla_splits, unsplit_schedule


@pytest.mark.parametrize("seqlens", [[], [0], [5, 0, 700], [1, 63, 64, 65, 1000], list(range(0, 5000, 37))])
def test_the_unsplit_schedule_is_the_contract_schedule_for_one_part(seqlens):
    lens = torch.tensor(seqlens, dtype=torch.int32)
    for got, expected in zip(unsplit_schedule(lens), schedule_mla_splits(lens, 64, 1, num_sms=1)):
        assert torch.equal(got, expected)


def test_opencl_hands_back_the_unsplit_schedule_and_decodes_with_it():
    backend = hal.get_backend("opencl")
    if not backend.available:
        pytest.skip(backend.availability().reason)
    lens = torch.tensor([1, 700, 64], dtype=torch.int32)
    with hal.use_backend("opencl"):
        metadata, splits = hal.get_mla_metadata(lens, 16, 1)
    assert metadata.shape == (1, 8) and torch.equal(splits, torch.arange(4, dtype=torch.int32))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 1, 16, 576, generator=gen).to(torch.bfloat16)
    cache = torch.randn(3 * 12, 64, 1, 576, generator=gen).to(torch.bfloat16)
    table = torch.arange(36, dtype=torch.int32).view(3, 12)
    with hal.use_backend("opencl"):
        out, lse = hal.flash_mla_with_kvcache(q, cache, table, lens, 512, metadata, splits)
    with hal.use_backend("reference"):
        ref_meta, ref_splits = hal.get_mla_metadata(lens, 16, 1)
        ref, ref_lse = hal.flash_mla_with_kvcache(q, cache, table, lens, 512, ref_meta, ref_splits)
    assert ref_meta.shape == (132, 8), "the reference keeps FlashMLA's Hopper schedule"
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_value_out_of_range_is_named_with_its_index(dtype):
    values = torch.tensor([[0, 3, 9], [2, -1, 4]], dtype=dtype)
    with pytest.raises(hal.ValueRangeError, match=r"-1 at ids\[1, 1\] \(1 out of range\)"):
        expect_in_range("op", "ids", values, 0, 10, what="ids", fix="")
    with pytest.raises(hal.ValueRangeError, match=r"10 at ids\[0, 0\]"):
        expect_in_range("op", "ids", torch.tensor([[10]], dtype=dtype), 0, 10, what="ids", fix="")
    expect_in_range("op", "ids", values.clamp(min=0), 0, 10, what="ids", fix="")


def test_value_checks_can_be_switched_off_on_cpu_too(monkeypatch):
    bad = torch.tensor([4, -3], dtype=torch.int32)
    with pytest.raises(hal.ValueRangeError, match="cache_seqlens"):
        hal.get_mla_metadata(bad, 16, 1)
    monkeypatch.setenv("HAL_CHECK_VALUES", "0")
    expect_in_range("op", "ids", bad, 0, 10, what="ids", fix="")  # not read
