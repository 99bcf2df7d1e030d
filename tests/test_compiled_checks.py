"""The compiled value checks (``hal/csrc/value_ranges.c``) give the verdicts of plain Python.

:func:`hal.compiled_checks.first_outside` is compared with a Python reading of the values on random
tensors with extreme values and bounds; what it must leave to torch (other dtypes, strided views,
bounds past int64) it answers None for; the operators name the same argument with it on and off.
"""

from __future__ import annotations

import random

import pytest
import torch

import hal
from hal import checks, compiled_checks
from hal.ccompiler import compiler
from hal.errors import ValueRangeError

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler here: value checks run in torch")


def test_the_library_is_built_and_used_where_a_compiler_is():
    # a build that fails, or gives wrong answers on the known values it is checked with when
    # loaded, is not used; where a compiler is, that is a bug to see here, not a skip
    assert compiled_checks.status().startswith("compiled"), compiled_checks.status()


def _truth(checks_: list[tuple[torch.Tensor, int, int]]) -> int:
    for position, (values, low, high) in enumerate(checks_):
        if any(not low <= v < high for v in values.flatten().tolist()):
            return position
    return -1


@pytest.mark.parametrize("seed", range(4))
def test_first_outside_is_the_first_tensor_python_finds_outside(seed: int):
    rng = random.Random(seed)
    for _ in range(300):
        checks_ = []
        for _ in range(rng.randint(1, 5)):
            dtype = rng.choice([torch.int32, torch.int64])
            info = torch.iinfo(dtype)
            count = rng.choice([0, 1, 2, 7, 33, 64, 129, 1000])
            values = torch.randint(-3, 50, (count,), dtype=dtype)
            if count and rng.random() < 0.4:
                values[rng.randrange(count)] = rng.choice([info.min, info.max, -2, 50, 49, -1])
            low = rng.choice([-1, 0, -3, info.min, -(2**63)])
            high = rng.choice([50, 49, 10, info.max, info.max + 1 if dtype == torch.int32 else info.max, 2**40])
            checks_.append((values.view(rng.choice([(count,), (1, count)])), low, high))
        assert compiled_checks.first_outside(checks_) == _truth(checks_), checks_


def test_what_it_cannot_read_is_left_to_torch():
    values = torch.arange(12, dtype=torch.int32).view(3, 4)
    assert compiled_checks.first_outside([(values, 0, 12)]) == -1
    assert compiled_checks.first_outside([(values.t(), 0, 12)]) is None  # strided
    assert compiled_checks.first_outside([(values[:, ::2], 0, 12)]) is None
    assert compiled_checks.first_outside([(values.to(torch.int16), 0, 12)]) is None
    assert compiled_checks.first_outside([(values.float(), 0, 12)]) is None
    assert compiled_checks.first_outside([(values, 0, 2**63)]) is None  # past int64
    assert compiled_checks.first_outside([(values, 0.5, 12)]) is None
    assert compiled_checks.first_outside([(values, 0, 12)] * 9) is None  # more than one call checks
    assert compiled_checks.first_outside([(values[1:], 4, 12)]) == -1  # an offset view reads from its own first element
    assert compiled_checks.first_outside([(values[1:], 5, 12)]) == 0


def test_the_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch):
    values = torch.arange(40, dtype=torch.int32)
    monkeypatch.setenv(compiled_checks.ENV_COMPILED_CHECKS, "0")
    assert compiled_checks.first_outside([(values, 0, 40)]) is None
    assert compiled_checks.status().startswith("torch")
    assert checks.first_outside([(values, 0, 40), (values, 1, 40)]) == 1  # the torch path
    monkeypatch.setenv(compiled_checks.ENV_COMPILED_CHECKS, "1")
    assert compiled_checks.first_outside([(values, 0, 40), (values, 1, 40)]) == 1


@pytest.mark.parametrize("seed", range(3))
def test_kept_ranges_give_first_outsides_verdicts_for_new_contents(seed: int):
    """Ranges kept for some layouts (fixed_ranges, Nones in place) give, for any tensors of those
    layouts, the position first_outside gives (counted with the Nones); the tensors' own values are
    read on every call, never the ones they were built from."""
    rng = random.Random(seed)
    for _ in range(200):
        layout = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.25:
                layout.append(None)
                continue
            layout.append((rng.choice([torch.int32, torch.int64]), rng.choice([(0,), (1,), (7,), (3, 33), (129,)]), rng.choice([-1, 0]), rng.choice([10, 50, 2**40])))

        def tensors():
            made = []
            for entry in layout:
                if entry is None:
                    made.append(None)
                    continue
                dtype, shape, low, high = entry
                values = torch.randint(low, min(high, 50), shape, dtype=dtype)
                if values.numel() and rng.random() < 0.4:
                    info = torch.iinfo(dtype)
                    values.view(-1)[rng.randrange(values.numel())] = rng.choice([v for v in (low - 1, high, info.min, info.max) if info.min <= v <= info.max])
                made.append(values)
            return made

        def bounds(made):
            return [(t, entry[2], entry[3]) if t is not None else (None, 0, 0) for t, entry in zip(made, layout)]

        kept = compiled_checks.fixed_ranges(bounds(tensors()))
        assert kept is not None
        for _ in range(3):
            made = tensors()
            truth = _truth([(t, low, high) for t, low, high in bounds(made) if t is not None])
            expected = -1 if truth < 0 else [i for i, t in enumerate(made) if t is not None][truth]
            assert kept(*made) == expected
            assert checks.first_outside_fixed(kept, tuple(made)) == expected


def test_kept_ranges_refuse_what_they_cannot_read(monkeypatch: pytest.MonkeyPatch):
    values = torch.arange(12, dtype=torch.int32).view(3, 4)
    assert compiled_checks.fixed_ranges([(values.t(), 0, 12)]) is None  # strided
    assert compiled_checks.fixed_ranges([(values.float(), 0, 12)]) is None
    assert compiled_checks.fixed_ranges([(values, 0, 2**63)]) is None  # past int64: a ctypes array would wrap it
    assert compiled_checks.fixed_ranges([(values, 0.5, 12)]) is None
    kept = compiled_checks.fixed_ranges([(values, 0, 12)])
    assert kept(values) == -1 and kept(values - 1) == 0
    monkeypatch.setenv(compiled_checks.ENV_COMPILED_CHECKS, "0")
    assert kept(values - 1) is None  # switched off: the caller checks in torch
    monkeypatch.setenv(checks.ENV_CHECK_VALUES, "0")
    assert checks.first_outside_fixed(kept, (values - 1,)) == -1  # values not read at all


def test_a_remembered_v3_2_layout_reads_its_indices_through_kept_ranges(monkeypatch: pytest.MonkeyPatch):
    """After its first call a sparse decode's layout keeps its index ranges: later calls read the
    new contents through them (the general check is not called), and an index out of range is
    still named."""
    from hal.ops import mla_v2

    g = torch.Generator().manual_seed(5)
    batch, s_q, h_q, topk, blocks, page = 2, 1, 16, 64, 2, 64
    q = torch.randn(batch, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    cache = hal.quantize_mla_kv_cache(torch.randn(blocks, page, 1, 576, generator=g).to(torch.bfloat16))
    schedule, _ = hal.get_mla_metadata()
    indices = torch.randint(-1, blocks * page, (batch, s_q, topk), generator=g, dtype=torch.int32)
    lengths = torch.tensor([topk, 9], dtype=torch.int32)
    run = lambda i: hal.flash_mla_with_kvcache(q, cache, None, None, 512, schedule, None, is_fp8_kvcache=True, indices=i, topk_length=lengths)  # noqa: E731
    run(indices)
    monkeypatch.setattr(mla_v2, "first_outside", lambda *_: pytest.fail("the general check ran"))
    run(indices.flip(-1).contiguous())
    bad = indices.clone()
    bad[1, 0, 0] = blocks * page
    with pytest.raises(ValueRangeError, match="indices"):
        run(bad)


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("broken", ["indices", "topk_length", "extra_indices_in_kvcache", "extra_topk_length"])
def test_v3_2_decode_names_the_index_tensor_out_of_range(broken: str, compiled: str, monkeypatch: pytest.MonkeyPatch):
    """One check covers all four index tensors of a sparse decode with an extra cache; the error
    still names the one that is out of range, with the compiled checks on and off."""
    monkeypatch.setenv(compiled_checks.ENV_COMPILED_CHECKS, compiled)
    g = torch.Generator().manual_seed(3)
    batch, s_q, h_q, topk, extra_topk, blocks, page = 2, 1, 16, 64, 32, 3, 64
    q = torch.randn(batch, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    cache = hal.quantize_mla_kv_cache(torch.randn(blocks, page, 1, 576, generator=g).to(torch.bfloat16))
    extra = hal.quantize_mla_kv_cache(torch.randn(1, page, 1, 576, generator=g).to(torch.bfloat16))
    arguments = {
        "indices": torch.randint(-1, blocks * page, (batch, s_q, topk), generator=g, dtype=torch.int32),
        "topk_length": torch.tensor([topk, 5], dtype=torch.int32),
        "extra_indices_in_kvcache": torch.randint(-1, page, (batch, s_q, extra_topk), generator=g, dtype=torch.int32),
        "extra_topk_length": torch.tensor([3, extra_topk], dtype=torch.int32),
    }
    schedule, _ = hal.get_mla_metadata()
    run = lambda args: hal.flash_mla_with_kvcache(q, cache, None, None, 512, schedule, None, is_fp8_kvcache=True, extra_k_cache=extra, **args)  # noqa: E731
    out, lse = run(arguments)
    assert torch.isfinite(out.float()).all()
    bad = dict(arguments)
    bad[broken] = arguments[broken].clone()
    bad[broken].view(-1)[-1] = {"indices": blocks * page, "topk_length": topk + 1, "extra_indices_in_kvcache": page, "extra_topk_length": extra_topk + 1}[broken]
    with pytest.raises(ValueRangeError, match=broken):
        run(bad)


@pytest.mark.parametrize("seed", range(3))
def test_pages_within_is_the_rule_read_entry_by_entry(seed: int):
    """Every length in [0, most] and, in each row, the first ceil(longest length / per_entry)
    entries in [0, high): tables of any size (the Python lists stop at 64 entries)."""
    rng = random.Random(seed)
    for _ in range(200):
        rows, cols, per_entry = rng.randint(0, 40), rng.randint(1, 70), rng.choice([1, 16, 64])
        high, most = rng.randint(1, 50), rng.randint(0, cols * per_entry + 2)
        table = torch.randint(0, high, (rows, cols), dtype=rng.choice([torch.int32, torch.int64]))
        k = rng.choice([None, 1, 2, 3])
        lengths = torch.randint(0, most + 1, (rows,) if k is None else (rows, k), dtype=torch.int32)
        if rows and rng.random() < 0.5:  # a stray entry or length, read or not
            r = rng.randrange(rows)
            if rng.random() < 0.7:
                table[r, rng.randrange(cols)] = rng.choice([-1, high, -(2**31)])
            else:
                lengths.view(-1)[rng.randrange(lengths.numel())] = rng.choice([-1, most + 1])
        longest = lengths.view(rows, -1).amax(dim=1).tolist() if rows and lengths.numel() else [0] * rows
        truth = all(0 <= v <= most for v in lengths.flatten().tolist()) and all(
            0 <= table[r, j] < high for r in range(rows) for j in range(min(cols, -(-longest[r] // per_entry))))
        assert compiled_checks.pages_within(table, lengths, most, high, per_entry) == truth, (table, lengths, most, high, per_entry)
    assert compiled_checks.pages_within(table.t(), lengths, most, high, per_entry) is None  # strided: left to the other paths
