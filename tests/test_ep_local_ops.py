"""The local EP operators (``hal.ep_pack``, ``hal.ep_unpack``, ``hal.ep_combine_reduce``) against
Python loops, their argument checks, and conformance catching a backend that gets them wrong."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.conformance.catalogue import select_cases
from hal.conformance.runner import run_backend


def pack_by_loops(rows: torch.Tensor, bucket_idx: torch.Tensor, num_buckets: int):
    order = []
    for bucket in range(num_buckets):
        for row, buckets in enumerate(bucket_idx.tolist()):
            order.extend([row] * buckets.count(bucket))
    counts = [sum(row.count(b) for row in bucket_idx.tolist()) for b in range(num_buckets)]
    return rows[order] if order else rows[:0], order, counts


def unpack_by_loops(rows: torch.Tensor, bucket_of_row: torch.Tensor, num_buckets: int, num_slots: int):
    slots = torch.zeros((num_buckets, num_slots) + tuple(rows.shape[1:]), dtype=rows.dtype)
    filled = [0] * num_buckets
    for row, bucket in enumerate(bucket_of_row.tolist()):
        slots[bucket, filled[bucket]] = rows[row]
        filled[bucket] += 1
    return slots, filled


def reduce_by_loops(rows: torch.Tensor, src_idx: torch.Tensor, num_tokens: int, weights: torch.Tensor | None):
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    for row, token in enumerate(src_idx.tolist()):
        out[token] += rows[row].double() * (1.0 if weights is None else float(weights[row]))
    return out


@pytest.mark.parametrize("num_rows, slots, buckets, dtype", [(9, 3, 4, torch.bfloat16), (20, 8, 64, torch.int64), (0, 2, 3, torch.float32), (5, 0, 2, torch.uint8)])
def test_pack_groups_rows_by_bucket_then_row(num_rows, slots, buckets, dtype):
    gen = torch.Generator().manual_seed(num_rows + slots)
    bucket_idx = torch.stack([torch.randperm(buckets, generator=gen)[:slots] for _ in range(num_rows)]) if num_rows else torch.empty(0, slots, dtype=torch.int64)
    bucket_idx[torch.rand(bucket_idx.shape, generator=gen) < 0.3] = -1
    rows = (torch.randn(num_rows, 7, generator=gen) * 100).to(dtype)
    packed, src_idx, counts = hal.ep_pack(rows, bucket_idx, buckets)
    want_rows, want_src, want_counts = pack_by_loops(rows, bucket_idx, buckets)
    assert packed.dtype == dtype and src_idx.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(packed, want_rows) and src_idx.tolist() == want_src and counts.tolist() == want_counts


def test_pack_repeats_a_row_for_a_repeated_bucket_in_slot_order():
    rows = torch.arange(6.0).view(3, 2)
    packed, src_idx, counts = hal.ep_pack(rows, torch.tensor([[1, 1], [-1, 0], [1, -1]]), 2)
    assert src_idx.tolist() == [1, 0, 0, 2] and counts.tolist() == [1, 3]


@pytest.mark.parametrize("buckets, slots, dtype", [(3, 5, torch.bfloat16), (6, 2, torch.int64), (1, 0, torch.float32)])
def test_unpack_places_rows_in_slots_keeping_their_order(buckets, slots, dtype):
    gen = torch.Generator().manual_seed(buckets * 10 + slots)
    counts = torch.randint(0, slots + 1, (buckets,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(buckets), counts)
    bucket_of_row = labels[torch.randperm(labels.numel(), generator=gen)].to(torch.int32)
    rows = (torch.randn(labels.numel(), 4, generator=gen) * 50).to(dtype)
    got, got_counts = hal.ep_unpack(rows, bucket_of_row, buckets, slots)
    want, want_counts = unpack_by_loops(rows, bucket_of_row, buckets, slots)
    assert torch.equal(got, want) and got_counts.tolist() == want_counts


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_reduce_sums_rows_into_tokens_in_fp32(weighted, dtype):
    gen = torch.Generator().manual_seed(3)
    src_idx = torch.tensor([4, 0, 4, 2, 4, 0], dtype=torch.int32)  # tokens 1 and 3 get nothing
    rows = torch.randn(6, 33, generator=gen).to(dtype)
    weights = torch.rand(6, generator=gen) if weighted else None
    out = hal.ep_combine_reduce(rows, src_idx, 5, weights)
    want = reduce_by_loops(rows, src_idx, 5, weights)
    assert out.dtype == dtype
    assert torch.equal(out[1], torch.zeros(33, dtype=dtype)) and torch.equal(out[3], torch.zeros(33, dtype=dtype))
    torch.testing.assert_close(out.double(), want.to(dtype).double(), rtol=2**-8 if dtype == torch.bfloat16 else 1e-6, atol=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: hal.ep_pack(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int32), 2), hal.DTypeError, "bucket_idx"),
        (lambda: hal.ep_pack(torch.zeros(3, 2), torch.zeros(2, 1, dtype=torch.int64), 2), hal.ShapeError, "num_rows is 2, not 3"),
        (lambda: hal.ep_pack(torch.zeros(3, 2), torch.tensor([[0], [2], [-1]]), 2), hal.ValueRangeError, r"bucket ids .*got 2"),
        (lambda: hal.ep_pack(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64), 0), hal.ValueRangeError, "num_buckets"),
        (lambda: hal.ep_unpack(torch.zeros(3, 2), torch.tensor([0, 0, 1], dtype=torch.int32), 2, 1), hal.ValueRangeError, "2 rows in bucket 0"),
        (lambda: hal.ep_unpack(torch.zeros(2, 2), torch.tensor([0, -1], dtype=torch.int32), 2, 4), hal.ValueRangeError, "bucket_of_row"),
        (lambda: hal.ep_combine_reduce(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), 1), hal.DTypeError, "rows"),
        (lambda: hal.ep_combine_reduce(torch.zeros(2, 2), torch.tensor([0, 3], dtype=torch.int32), 3), hal.ValueRangeError, "token ids"),
        (lambda: hal.ep_combine_reduce(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int32), 1, torch.ones(3)), hal.ShapeError, "weights"),
    ],
)
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("seed", range(3))
def test_unpack_value_checks_name_the_first_fault_on_every_path(seed: int):
    """Few rows (read as lists) and many (NumPy's bincount) give the same verdicts: an id out of
    range, else the fullest bucket past num_slots, else the call runs."""
    import random

    rng = random.Random(seed)
    for _ in range(150):
        s, buckets = rng.choice([rng.randint(0, 20), rng.randint(65, 200)]), rng.randint(1, 6)
        slots = rng.randint(0, s + 2)
        ids = torch.randint(-1 if rng.random() < 0.2 else 0, buckets + (1 if rng.random() < 0.2 else 0), (s,), dtype=torch.int32)
        counts = torch.bincount(ids.clamp(min=0).long(), minlength=buckets + 1)
        try:
            hal.ep_unpack(torch.zeros(s, 2), ids, buckets, slots)
            verdict = None
        except hal.ValueRangeError as error:
            verdict = str(error)
        if s and (int(ids.min()) < 0 or int(ids.max()) >= buckets):
            assert verdict is not None and "bucket ids" in verdict
        elif s and int(counts.max()) > slots:
            full = int(counts.argmax())
            assert verdict is not None and f"{int(counts[full])} rows in bucket {full}" in verdict
        else:
            assert verdict is None


@pytest.mark.parametrize("op, wrong", [("ep_pack", "buckets in descending order"), ("ep_unpack", "the last row dropped"), ("ep_combine_reduce", "float16 accumulation")])
def test_conformance_rejects_a_backend_that_gets_them_wrong(install_plugins, op, wrong):
    install_plugins({"wrong_ep": "wrong_ep"})
    results = run_backend("wrong_ep", select_cases(quick=True, ops=[op]))
    assert results and all(r.status == "fail" for r in results), (wrong, [(r.case_id, r.status, r.reason) for r in results])
    assert all(r.passed for r in run_backend("reference", select_cases(quick=True, ops=[op])))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bool, torch.int8, torch.float64])
def test_unpack_moves_rows_of_any_dtype_bitwise(dtype):
    rows = (torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    bucket_of_row = torch.tensor([1, 0, 1, 2, 0, 1], dtype=torch.int32)
    slots, counts = hal.ep_unpack(rows, bucket_of_row, 3, 4)
    assert slots.dtype == dtype and counts.tolist() == [2, 3, 1]
    raw, expected = slots.view(torch.uint8), rows.view(torch.uint8)
    assert torch.equal(raw[1, :3], expected[[0, 2, 5]]) and torch.equal(raw[0, :2], expected[[1, 4]])
    assert not raw[1, 3:].any()
