"""FlashMLA's split-KV schedule computed on the device (one Triton program) equals the host form
element for element, so the get_mla_metadata() schedule object is filled without a host sync."""

from __future__ import annotations

import random

import torch

import hal
from hal.backends.triton.schedule import schedule_mla_splits_on_device
from hal.ops.mla_schedule import schedule_mla_splits


def test_device_schedule_equals_the_host_schedule():
    rng = random.Random(5)
    for _ in range(60):
        batch = rng.choice([1, 2, 5, 40])
        seqlens = torch.tensor([rng.choice([0, 1, 64, 65, rng.randrange(5000)]) for _ in range(batch)], dtype=torch.int32)
        args = (rng.choice([1, 64, 128, 256]), rng.choice([1, 2]), rng.choice([1, 8, 78, 132]))
        host = schedule_mla_splits(seqlens, *args)
        device = schedule_mla_splits_on_device(seqlens, *args)
        assert torch.equal(host[0], device[0]) and torch.equal(host[1], device[1]), (seqlens.tolist(), args)


def test_the_schedule_object_is_filled_by_the_triton_backend_and_decodes():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 16, 576, generator=g).half()
    cache = torch.randn(6, 64, 1, 576, generator=g).half()
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    seqlens = torch.tensor([150, 70], dtype=torch.int32)
    with hal.use_backend("cuda"):
        schedule, _ = hal.get_mla_metadata()
        out, lse = hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, schedule, None)
    assert schedule.have_initialized and schedule.tile_scheduler_metadata is not None
    assert torch.equal(schedule.tile_scheduler_metadata, schedule_mla_splits(seqlens, 16, 1)[0])
    with hal.use_backend("reference"):
        want, want_lse = hal.flash_mla_with_kvcache(q, cache, table, seqlens, 512, *hal.get_mla_metadata(seqlens, 16, 1))
    assert torch.allclose(out.float(), want.float(), atol=2e-3) and torch.allclose(lse, want_lse, atol=1e-4)
