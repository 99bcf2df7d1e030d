"""The host-side fast paths give the verdicts of their plain torch formulations.

Value checks and CPU schedules take NumPy paths when NumPy is installed (``hal.optional``); each is
compared here, on random inputs, with the torch path it replaces (NumPy switched off).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import hal
from hal import compiled_checks, optional
from hal.checks import SMALL, expect_in_range, expect_rows_in_range, small_pages_within
from hal.errors import ValueRangeError
from hal.ops import gemm


@pytest.fixture
def without_numpy(monkeypatch: pytest.MonkeyPatch):
    """``switch(off)``: the NumPy path (off False) or the torch path (off True), small tensors
    included, compiled checks off; ``switch("lists")``: the default, small tensors read as Python
    lists, larger int32/int64 ones by the compiled checks (:mod:`hal.compiled_checks`)."""
    from hal import checks

    def switch(off: bool | str) -> None:
        monkeypatch.setenv("HAL_COMPILED_CHECKS", "1" if off == "lists" else "0")
        monkeypatch.setattr(optional, "_NUMPY", False if off is True else None)
        monkeypatch.setattr(checks, "SMALL", 64 if off == "lists" else 0)
        monkeypatch.setattr(checks, "_LISTED_1D", 24 if off == "lists" else 0)
        monkeypatch.setattr(checks, "_LISTED_2D", 16 if off == "lists" else 0)

    return switch


def _verdict(check) -> str | None:
    try:
        check()
    except ValueRangeError as error:
        return str(error)
    return None


def _rows_truth(table: torch.Tensor, lengths: torch.Tensor, low: int, high: int, per_entry: int) -> tuple[int, int] | None:
    for r in range(table.shape[0]):
        for j in range(table.shape[1]):
            if j * per_entry < int(lengths[r]) and not low <= int(table[r, j]) < high:
                return r, j
    return None


@pytest.mark.parametrize("seed", range(4))
def test_rows_in_range_reads_only_the_used_prefix_on_both_paths(seed: int, without_numpy):
    rng = random.Random(seed)
    for _ in range(150):
        rows, width, per_entry = rng.randint(1, 6), rng.randint(1, 7), rng.choice([1, 16, 64])
        low, high = rng.choice([0, 0, -1, 2]), rng.randint(3, 9)
        dtype = rng.choice([torch.int32, torch.int64])
        table = torch.randint(-3, 12, (rows, width), dtype=dtype)
        if rng.random() < 0.5:  # a column-major view: strided tables too
            table = torch.randint(-3, 12, (width, rows), dtype=dtype).t()
        lengths = torch.randint(0, width * per_entry + 1, (rows,), dtype=torch.int32)
        if rng.random() < 0.3:  # [rows, k]: a row reads up to the longest of its k lengths
            lengths = torch.randint(0, width * per_entry + 1, (rows, rng.randint(1, 3)), dtype=torch.int32)
        truth = _rows_truth(table, lengths.amax(dim=1) if lengths.dim() == 2 else lengths, low, high, per_entry)
        verdicts = []
        for off in ("lists", False, True):
            without_numpy(off)
            verdicts.append(_verdict(lambda: expect_rows_in_range(
                "op", "block_table", table, lengths, low, high, per_entry=per_entry, what="ids", fix="fix")))
        assert verdicts[0] == verdicts[1] == verdicts[2]
        if truth is None:
            assert verdicts[0] is None
        else:  # the first offending used entry, by position, is the one named
            assert f"at block_table[{truth[0]}, {truth[1]}]" in verdicts[0]


def test_rows_in_range_computes_lazy_lengths_only_when_needed():
    asked = []

    def lengths() -> torch.Tensor:
        asked.append(True)
        return torch.tensor([1, 1])

    expect_rows_in_range("op", "t", torch.tensor([[0, 1], [2, 3]]), lengths, 0, 4, what="ids", fix="fix")
    assert not asked
    expect_rows_in_range("op", "t", torch.tensor([[0, -1], [2, -1]]), lengths, 0, 4, what="ids", fix="fix")
    assert asked


@pytest.mark.parametrize("seed", range(3))
def test_paged_logits_schedule_is_the_same_on_every_path(seed: int, without_numpy, monkeypatch: pytest.MonkeyPatch):
    """The split looked up by segment counts (small batches), NumPy's and the torch path's agree,
    for lengths in one segment, across segment boundaries, negative and zero."""
    from hal.ops import indexer

    rng = random.Random(seed)
    for _ in range(200):
        batch, next_n, sms = rng.choice([rng.randint(0, 30), rng.randint(250, 300)]), rng.choice([1, 2, 4]), rng.randint(1, 140)
        lens = torch.randint(-2, rng.choice([5, 300, 20000]), (batch, next_n), dtype=torch.int32)
        lens = lens if rng.random() < 0.5 else lens[:, -1].contiguous()
        results = []
        for off, small_batch in (("lists", 256), (False, 256), (False, 0), (True, 256)):
            without_numpy(off)
            monkeypatch.setattr(indexer, "_SMALL_BATCH", small_batch)
            results.append(hal.get_paged_mqa_logits_metadata(lens, 64, sms))
        for result in results[1:]:
            assert result.dtype == torch.int32 and torch.equal(results[0], result)


def test_a_looked_up_paged_logits_schedule_is_the_callers_own():
    lens = torch.tensor([[300], [10]], dtype=torch.int32)
    first = hal.get_paged_mqa_logits_metadata(lens, 64, 4)
    expected = first.clone()
    first.fill_(-7)  # the caller writes into its result: the next step's split must not change
    assert torch.equal(hal.get_paged_mqa_logits_metadata(lens + 1, 64, 4), expected)


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("seed", range(4))
def test_small_pages_within_is_the_verdict_of_the_general_checks(seed: int, compiled: str, monkeypatch: pytest.MonkeyPatch):
    """True exactly when every length is in [0, most] and every page a row reads is in range (the
    rule of expect_rows_in_range, checked here entry by entry); False past SMALL entries."""
    monkeypatch.setenv("HAL_COMPILED_CHECKS", compiled)
    rng = random.Random(100 + seed)
    for _ in range(300):
        rows, width, per_entry = rng.randint(0, 6), rng.randint(1, 9), rng.choice([1, 16, 64])
        high, most = rng.randint(1, 9), rng.randint(0, width * per_entry + 2)
        table = torch.randint(-2, 11, (rows, width), dtype=rng.choice([torch.int32, torch.int64]))
        if rng.random() < 0.3:
            table = torch.randint(-2, 11, (width, rows), dtype=table.dtype).t()
        shape = (rows,) if rng.random() < 0.6 else (rows, rng.randint(1, 3))
        lengths = torch.randint(-1 if rng.random() < 0.3 else 0, width * per_entry + 3, shape, dtype=torch.int32)
        limits = lengths.amax(dim=1) if lengths.dim() == 2 and lengths.shape[1] else lengths
        truth = (not lengths.numel() or (int(lengths.min()) >= 0 and int(lengths.max()) <= most)) and _rows_truth(
            table, limits.reshape(rows), 0, high, per_entry) is None
        assert small_pages_within(table, lengths, most, high, per_entry) == truth
    wide = torch.zeros(2, SMALL // 2 + 1, dtype=torch.int32)
    # past SMALL the general checks decide, unless the compiled checks read it
    assert small_pages_within(wide, torch.zeros(2, dtype=torch.int32), 0, 1, 64) == (compiled_checks.pages_within(wide, torch.zeros(2, dtype=torch.int32), 0, 1, 64) is not None)


def test_only_small_contiguous_layouts_keep_their_mapping():
    """The mapping is kept per layout of blocks for decode-sized M; a prefill-sized M (routing new
    every call) is mapped afresh and not kept, so the table never holds M-row tensors."""
    align = gemm.get_m_alignment_for_contiguous_layout()
    gemm._MAPPINGS.clear()
    small = torch.arange(4, dtype=torch.int32).repeat_interleave(align)
    first = gemm.contiguous_rows("op", small, 4)
    assert gemm.contiguous_rows("op", small.clone(), 4) is first and len(gemm._MAPPINGS) == 1
    large = torch.arange(gemm._MAPPED_BLOCKS + 1, dtype=torch.int32).repeat_interleave(align)
    mapped = gemm.contiguous_rows("op", large, gemm._MAPPED_BLOCKS + 1)
    assert torch.equal(mapped, large) and len(gemm._MAPPINGS) == 1


def test_a_nan_is_in_no_range():
    values = torch.tensor([1.0, math.nan, 2.0])
    with pytest.raises(ValueRangeError, match=r"nan at x\[1\]"):
        expect_in_range("op", "x", values, 0, 10, what="values", fix="fix")


def _segments_truth(m_indices: torch.Tensor, align: int) -> int | None:
    blocks = m_indices.view(-1, align)
    valid = blocks >= 0
    mixed = (valid & (blocks != blocks[:, :1])).any(dim=1) | (valid[:, 1:] & ~valid[:, :-1]).any(dim=1)
    return int(mixed.nonzero()[0]) if bool(mixed.any()) else None


@pytest.mark.parametrize("seed", range(3))
def test_contiguous_segments_check_matches_the_blockwise_definition(seed: int, without_numpy):
    rng = random.Random(seed)
    align = gemm.get_m_alignment_for_contiguous_layout()
    for _ in range(300):
        groups, values = rng.randint(1, 4), []
        for _ in range(rng.choice([1, 2, 3, 4, 48])):  # 48 blocks: more id changes than are checked one by one
            block = [rng.randint(-1, groups - 1)] * (count := rng.randint(0, align)) + [-1] * (align - count)
            for _ in range(rng.choice([0, 0, 1, 2])):
                block[rng.randrange(align)] = rng.randint(-1, groups - 1)
            values += block
        m_indices = torch.tensor(values, dtype=torch.int32)
        truth = _segments_truth(m_indices, align)
        for off in ("lists", False, True):
            without_numpy(off)
            verdict = _verdict(lambda: gemm._check_contiguous_segments("op", m_indices))
            if truth is None:
                assert verdict is None
            else:
                assert verdict is not None and f"rows {truth * align}..{(truth + 1) * align - 1}" in verdict


def test_rows_in_range_of_narrow_dtypes_agree_on_both_paths(without_numpy):
    # The NumPy path reads negatives as unsigned only where that exceeds every allowed value.
    for dtype, value, high in ((torch.int8, -100, 200), (torch.int16, -1, 70000), (torch.int32, -1, 2**32)):
        table = torch.tensor([[value]], dtype=dtype)
        verdicts = []
        for off in ("lists", False, True):
            without_numpy(off)
            verdicts.append(_verdict(lambda: expect_rows_in_range("op", "t", table, torch.tensor([1]), 0, high, what="ids", fix="fix")))
        assert verdicts[0] is not None and verdicts[0] == verdicts[1] == verdicts[2], (dtype, verdicts)
    # bounds beyond a narrow dtype's range are vacuous, not wrapped into it
    for dtype, value, low, high, bad in ((torch.uint8, 5, -1, 2**40, False), (torch.uint8, 5, -1, 5, True), (torch.int8, -100, -2**40, 2**40, False)):
        table = torch.tensor([[value, 1]], dtype=dtype)
        for off in ("lists", False, True):
            without_numpy(off)
            verdict = _verdict(lambda: expect_rows_in_range("op", "t", table, torch.tensor([2]), low, high, what="ids", fix="fix"))
            assert (verdict is not None) == bad and (not bad or "at t[0, 0]" in verdict), (dtype, low, high, off, verdict)


@pytest.mark.parametrize("seed", range(3))
def test_in_range_agrees_on_both_paths(seed: int, without_numpy):
    # One unsigned maximum where low is 0 and high fits the signed range, min and max otherwise.
    rng = random.Random(seed)
    for _ in range(200):
        dtype = rng.choice([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
        info = torch.iinfo(dtype)
        low = rng.choice([0, 0, -1, 2, info.min])
        high = rng.choice([rng.randint(3, 9), info.max, info.max + 1, 2**40])
        values = torch.randint(max(info.min, -4), min(info.max, 12) + 1, (rng.randint(1, 9),), dtype=dtype)
        if rng.random() < 0.3:
            values[rng.randrange(values.numel())] = rng.choice([info.min, info.max])
        truth = next((i for i, v in enumerate(values.tolist()) if not low <= v < high), None)
        verdicts = []
        for off in ("lists", False, True):
            without_numpy(off)
            verdicts.append(_verdict(lambda: expect_in_range("op", "ids", values, low, high, what="ids", fix="fix")))
        assert verdicts[0] == verdicts[1] == verdicts[2], (dtype, low, high, values)
        assert (verdicts[0] is None) == (truth is None), (dtype, low, high, values, verdicts)
        if truth is not None:
            assert f"at ids[{truth}]" in verdicts[0]


def test_paged_logits_schedule_is_traced_as_torch_operations():
    # Tracers must see the schedule's arithmetic: NumPy would hand them a constant.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def schedule(lens: torch.Tensor) -> torch.Tensor:
        return hal.get_paged_mqa_logits_metadata(lens, 64, 4)

    traced = make_fx(schedule, tracing_mode="real")(torch.tensor([[100], [7000]], dtype=torch.int32))
    other = torch.tensor([[9000], [3]], dtype=torch.int32)
    assert torch.equal(traced(other), schedule(other))
    with FakeTensorMode():
        fake = hal.get_paged_mqa_logits_metadata(torch.zeros(3, 1, dtype=torch.int32), 64, 4)
    assert fake.shape == (5, 2)


def test_numpy_is_found_under_a_bf16_default_dtype(monkeypatch: pytest.MonkeyPatch):
    # FlashMLA's tests set torch's default dtype to bf16 before their first call; NumPy has no
    # bf16, so the probe must not depend on the default.
    monkeypatch.setattr(optional, "_NUMPY", None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert optional.numpy() is not None
    finally:
        torch.set_default_dtype(previous)


def test_results_do_not_depend_on_the_default_dtype():
    # One quick case per operator, run as selected for CPU tensors under the float32 and the bf16
    # default dtype: nothing inside may build a float tensor without naming its dtype.
    from hal.conformance.case import copied_to
    from hal.conformance.catalogue import select_cases

    smallest: dict[str, object] = {}
    for case in select_cases(quick=True):
        if case.op.startswith("ep_") and case.op not in ("ep_dispatch_layout", "ep_pack", "ep_unpack", "ep_combine_reduce"):
            continue  # the multi-rank EP cases run in their own tests
        if case.op not in smallest:
            smallest[case.op] = case
    previous = torch.get_default_dtype()
    for case in smallest.values():
        inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
        want = case.family.run(copied_to(inputs, "cpu"))
        torch.set_default_dtype(torch.bfloat16)
        try:
            got = case.family.run(copied_to(inputs, "cpu"))
        finally:
            torch.set_default_dtype(previous)
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[name].dtype == value.dtype, (case.id, name)
                same_bits = got[name].view(torch.uint8) if value.element_size() == 1 else None  # fp8: compare codes
                if same_bits is not None:
                    assert torch.equal(same_bits, value.view(torch.uint8)), (case.id, name)
                else:
                    assert torch.equal(got[name].nan_to_num(nan=7.0) if value.is_floating_point() else got[name],
                                       value.nan_to_num(nan=7.0) if value.is_floating_point() else value), (case.id, name)


def test_rows_by_block_is_the_same_on_both_paths(without_numpy):
    # Each row takes its aligned block's first row's group (DeepGEMM computes whole tiles).
    rng = random.Random(5)
    align = gemm.get_m_alignment_for_contiguous_layout()
    for _ in range(20):
        blocks = rng.randint(1, 5)
        rows = torch.tensor([rng.choice([-1, 0, 1, 2]) for _ in range(blocks * align * 2)], dtype=torch.int32)[::2]  # strided too
        want = torch.tensor([int(rows[r // align * align]) for r in range(rows.numel())], dtype=torch.int32)
        for off in ("lists", False, True):
            without_numpy(off)
            got = gemm.rows_by_block(rows)
            assert got.dtype == torch.int32 and torch.equal(got, want)


def test_signature_tells_every_checked_property_apart():
    from hal.checks import signature

    x = torch.zeros(4, 6)
    same = signature(x, 3, None, torch.float32)
    assert same == signature(torch.ones(4, 6), 3, None, torch.float32)  # contents are not in it
    variants = [
        (x.to(torch.bfloat16), 3, None, torch.float32),  # dtype
        (torch.zeros(6, 4), 3, None, torch.float32),  # shape
        (torch.zeros(6, 4).t(), 3, None, torch.float32),  # strides
        (torch.zeros(4, 6, requires_grad=True), 3, None, torch.float32),  # requires_grad
        (torch.zeros(4, 6, device="meta"), 3, None, torch.float32),  # device
        (x, 3.0, None, torch.float32),  # an int and an equal float
        (x, 3, False, torch.float32),  # None and False
        (x, 3, None, torch.bfloat16),
    ]
    assert len({signature(*v) for v in variants} | {same}) == len(variants) + 1
    assert signature(x, True) != signature(x, 1)
    assert signature([x], 3) is None and signature((x,), 3) is None  # containers of tensors, lists: not signable
    recipes = [(1, 128, 128), (1, 1, 128), (1, 128), (1.0, 128, 128), (True, 128, 128), None]  # tuples of scalars, typed
    assert len({signature(x, r) for r in recipes}) == len(recipes) and signature(x, [1, 128, 128]) is None
    assert signature(torch.nn.Parameter(x)) is None  # a tensor subclass: not signable


def test_remembered_layouts_are_bounded():
    from hal.checks import remember

    seen: set = set()
    for i in range(10):
        remember(seen, (i,), limit=4)
    assert len(seen) <= 4 and (9,) in seen
    remember(seen, None)
    assert None not in seen


def test_layouts_find_exactly_the_remembered_signatures():
    """A remembered layout is found again (by the guard path or the signature path) and nothing
    else is: every property a signature tells apart, a tensor in another position, a subclass,
    more layouts than one pattern's guards keep, and a memo that starts over at its limit."""
    from hal.checks import signature
    from hal.layouts import Layouts

    layouts = Layouts()
    x = torch.zeros(4, 6)
    values = ("op", x, 3, None, torch.float32, (1, 128, 128))
    assert layouts.lookup(values) == (signature(*values), None)
    layouts.remember(values, signature(*values), "checked")
    for _ in range(2):  # the second lookup takes the guard the first one left
        key, value = layouts.lookup(("op", torch.ones(4, 6), 3, None, torch.float32, (1, 128, 128)))  # contents are not in it
        assert value == "checked" and key == signature(*values)
    variants = [
        ("op", x.to(torch.bfloat16), 3, None, torch.float32, (1, 128, 128)),  # dtype
        ("op", torch.zeros(6, 4), 3, None, torch.float32, (1, 128, 128)),  # shape
        ("op", torch.zeros(6, 4).t(), 3, None, torch.float32, (1, 128, 128)),  # strides
        ("op", torch.zeros(4, 6, requires_grad=True), 3, None, torch.float32, (1, 128, 128)),  # requires_grad
        ("op", torch.zeros(4, 6, device="meta"), 3, None, torch.float32, (1, 128, 128)),  # device
        ("op", x, 3.0, None, torch.float32, (1, 128, 128)),  # an int and an equal float
        ("op", x, True, None, torch.float32, (1, 128, 128)),  # an int and an equal bool
        ("op", x, 3, False, torch.float32, (1, 128, 128)),  # None and False
        ("op", x, 3, None, torch.bfloat16, (1, 128, 128)),
        ("op", x, 3, None, torch.float32, (True, 128, 128)),  # a recipe's items are typed
        ("op", x, 3, x, torch.float32, (1, 128, 128)),  # a tensor where None was
        ("op", None, 3, x, torch.float32, (1, 128, 128)),  # the tensor in another position
        ("op2", x, 3, None, torch.float32, (1, 128, 128)),
        ("op", torch.nn.Parameter(x), 3, None, torch.float32, (1, 128, 128)),  # a subclass
    ]
    for variant in variants:
        assert layouts.lookup(variant)[1] is None, variant
    shapes = [torch.zeros(4, n) for n in range(1, 20)]  # more layouts of one pattern than it keeps guards for
    for t in shapes:
        v = ("op", t, 3, None, torch.float32, (1, 128, 128))
        layouts.remember(v, signature(*v), t.shape[1])
    for _ in range(2):
        for t in shapes:
            assert layouts.lookup(("op", torch.ones_like(t), 3, None, torch.float32, (1, 128, 128)))[1] == t.shape[1]
    small = Layouts(limit=4)
    for t in shapes:
        small.remember((t,), signature(t))
    assert len(small) <= 4 and small.lookup((shapes[-1],))[1] is True and small.lookup((shapes[0],))[1] is None
    assert layouts.lookup(([x], 3)) == (None, None)  # a list: no signature, checked every call


def test_layouts_find_a_remembered_layout_without_building_its_signature(monkeypatch: pytest.MonkeyPatch):
    """The point of Layouts: a repeated layout is found by torch's tensor guard, the 3-4 us
    signature is not built. (Without the guard, which is private to torch, lookups still work,
    through signatures: this test then says the fast path is gone.)"""
    from hal import layouts as module
    from hal.checks import signature

    layouts = module.Layouts()
    values = ("op", torch.zeros(4, 6), 3, None, torch.zeros(2, dtype=torch.int32))
    layouts.remember(values, signature(*values), "checked")

    def refuse(*_: object) -> None:
        raise AssertionError("the signature was built")

    monkeypatch.setattr(module, "signature", refuse)
    assert layouts.lookup(("op", torch.ones(4, 6), 3, None, torch.ones(2, dtype=torch.int32)))[1] == "checked"


def test_a_tensor_given_twice_is_found_by_its_guard(monkeypatch: pytest.MonkeyPatch):
    """A call that gives one tensor twice (DeepGEMM's ``d`` given as ``c``, to accumulate) is found
    by a guard like any other, without its signature (a guard given the same tensor twice never
    passes, so such calls were checked every time); the same layouts in distinct tensors share its
    verdict, and other layouts, repeated or not, are not excused."""
    from hal import layouts as module
    from hal.checks import signature

    layouts = module.Layouts()
    x, s = torch.zeros(4, 6), torch.zeros(3, dtype=torch.int32)
    values = ("op", s, x, x, 3)
    layouts.remember(values, signature(*values), "checked")
    with monkeypatch.context() as patch:
        patch.setattr(module, "signature", lambda *_: pytest.fail("the signature was built"))
        y = torch.ones(4, 6)
        assert layouts.lookup(("op", s.clone(), y, y, 3))[1] == "checked"
    assert layouts.lookup(("op", s, torch.ones(4, 6), torch.ones(4, 6), 3))[1] == "checked"  # distinct: by signature
    wide = torch.zeros(4, 7)
    for other in [("op", s, wide, wide, 3), ("op", s, x, wide, 3), ("op", s, wide, x, 3), ("op", s, x, x, 4), ("op", x, s, s, 3)]:
        assert layouts.lookup(other)[1] is None, other


def _fp8_operands(m: int, n: int, k: int):
    a = torch.randn(m, k).to(torch.float8_e4m3fn)
    b = torch.randn(n, k).to(torch.float8_e4m3fn)
    return (a, torch.ones(m, k // 128)), (b, torch.ones(-(-n // 128), k // 128))


def test_a_layout_that_passed_does_not_excuse_a_different_one():
    """Structural checks are skipped only for a signature that passed them: after valid calls, the
    same shapes with another layout, dtype, grad flag or scalar type still raise."""
    from hal.errors import ArgumentError, DTypeError, HalError, LayoutError

    lhs, rhs = _fp8_operands(4, 256, 256)
    out = torch.empty(4, 256, dtype=torch.bfloat16)
    for _ in range(2):
        hal.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    with pytest.raises(LayoutError, match="out"):
        hal.gemm_fp8_fp8_bf16_nt(lhs, rhs, torch.empty(256, 4, dtype=torch.bfloat16).t())
    with pytest.raises(ArgumentError, match="requires_grad"):
        hal.gemm_fp8_fp8_bf16_nt(lhs, rhs, torch.empty(4, 256, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(DTypeError, match="rhs"):
        hal.gemm_fp8_fp8_bf16_nt(lhs, (rhs[0], rhs[1].double()), out)
    with pytest.raises(DTypeError, match="out"):
        hal.gemm_fp8_fp8_bf16_nt(lhs, rhs, out.float())

    masked_lhs = (lhs[0][None].expand(2, -1, -1).contiguous(), lhs[1][None].expand(2, -1, -1).contiguous())
    grouped_rhs = (rhs[0][None].expand(2, -1, -1).contiguous(), rhs[1][None].expand(2, -1, -1).contiguous())
    masked_out = torch.empty(2, 4, 256, dtype=torch.bfloat16)
    masked_m = torch.tensor([4, 1], dtype=torch.int32)
    hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, masked_out, masked_m, 4)
    with pytest.raises(HalError, match="expected_m"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, masked_out, masked_m, 4.0)
    with pytest.raises(DTypeError, match="masked_m"):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, masked_out, masked_m.long(), 4)
    with pytest.raises(ValueRangeError, match="masked_m"):  # contents: checked on every call
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, masked_out, torch.tensor([5, 1], dtype=torch.int32), 4)

    # EP combine's reduction, rows in two segments: the segments' count, dtypes and widths are keyed
    rows = (torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16))
    src_idx, weights = torch.tensor([0, 1, 1, 2, 0], dtype=torch.int32), torch.rand(5)
    for _ in range(2):
        hal.ep_combine_reduce(rows, src_idx, 3, weights)
    with pytest.raises(DTypeError, match="rows\\[1\\]"):
        hal.ep_combine_reduce((rows[0], rows[1].half()), src_idx, 3, weights)
    with pytest.raises(HalError, match="rows\\[1\\]"):
        hal.ep_combine_reduce((rows[0], torch.randn(2, 4, dtype=torch.bfloat16)), src_idx, 3, weights)
    with pytest.raises(HalError, match="src_idx"):
        hal.ep_combine_reduce(rows[:1], src_idx, 3, weights)  # one segment: 3 rows against 5 ids
    with pytest.raises(DTypeError, match="weights"):
        hal.ep_combine_reduce(rows, src_idx, 3, weights.double())
    with pytest.raises(ValueRangeError, match="src_idx"):  # contents: checked on every call
        hal.ep_combine_reduce(rows, torch.tensor([0, 1, 3, 2, 0], dtype=torch.int32), 3, weights)


def test_a_dense_v2_layout_that_passed_does_not_excuse_a_different_one():
    """DeepGEMM's current fp8_gemm_nt remembers layouts with their recipes: after valid calls, another
    recipe, output layout or dtype, accumulator dtype or scale layout still raises, and a list recipe
    (not signable) is checked every call."""
    from hal.errors import DTypeError, LayoutError, ShapeError

    lhs, rhs = _fp8_operands(4, 256, 256)
    d = torch.empty(4, 256, dtype=torch.bfloat16)
    for _ in range(2):
        hal.fp8_gemm_nt(lhs, rhs, d)
        hal.fp8_gemm_nt(lhs, rhs, d, recipe=(1, 128, 128))
    expected = d.clone()
    hal.fp8_gemm_nt(lhs, rhs, d, recipe=[1, 128, 128])
    assert torch.equal(d, expected)
    with pytest.raises(ValueRangeError, match="recipe"):
        hal.fp8_gemm_nt(lhs, rhs, d, recipe=(1, 64, 128))
    with pytest.raises(ShapeError, match="b\\[1\\]"):  # per-token recipe, per-block scales
        hal.fp8_gemm_nt(lhs, rhs, d, recipe=(1, 1, 128))
    with pytest.raises(LayoutError, match="'d'"):
        hal.fp8_gemm_nt(lhs, rhs, torch.empty(256, 4, dtype=torch.bfloat16).t())
    with pytest.raises(DTypeError, match="'d'"):
        hal.fp8_gemm_nt(lhs, rhs, d.half())
    with pytest.raises(DTypeError, match="'c'"):
        hal.fp8_gemm_nt(lhs, rhs, d.float(), c=torch.zeros(4, 256, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="a\\[1\\]"):
        hal.fp8_gemm_nt((lhs[0], lhs[1][:, :1]), rhs, d)


@pytest.mark.parametrize("op", ["mla_decode", "paged_mqa_logits", "mqa_logits"])
def test_index_contents_are_checked_on_every_call_after_the_layout_passed(op: str):
    """The first quick case of each operator runs (its layout remembered), then again with one index
    out of range: the value check still raises."""
    from hal.conformance.catalogue import select_cases

    case = next(c for c in select_cases(quick=True, ops=[op]) if "noncausal" in c.id or op != "mla_decode")
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    case.family.run(dict(inputs))
    broken = dict(inputs)
    name = {"mla_decode": "cache_seqlens", "paged_mqa_logits": "context_lens", "mqa_logits": "end"}[op]
    broken[name] = inputs[name].clone()
    broken[name].view(-1)[0] = -5
    with pytest.raises(ValueRangeError, match="cu_seq_len_k_end" if name == "end" else name):
        case.family.run(broken)


@pytest.mark.parametrize("shape", [(3, 2), (2, 1, 3), (1, 5), (), (7,), (30,), (4, 5), (2, 2, 32)])
def test_in_range_of_2d_and_3d_values_agrees_on_every_path(shape, without_numpy):
    from hal.checks import values_within

    rng = random.Random(len(shape))
    for _ in range(60):
        values = torch.randint(-2, 9, shape, dtype=torch.int32)
        low, high = rng.choice([0, -1]), rng.randint(4, 9)
        truth = all(low <= v < high for v in values.flatten().tolist())
        verdicts = []
        for off in ("lists", False, True):
            without_numpy(off)
            assert values_within(values, low, high) == truth
            verdicts.append(_verdict(lambda: expect_in_range("op", "ids", values, low, high, what="ids", fix="fix")))
        assert verdicts[0] == verdicts[1] == verdicts[2] and (verdicts[0] is None) == truth


@pytest.mark.parametrize("seed", range(3))
def test_contiguous_rows_agree_with_the_separate_checks_and_mapping(seed: int, without_numpy):
    """contiguous_rows (NumPy on CPU tensors: the changes of id one by one, or vectorised when there
    are many) raises what the range check then the segment check raise, in that order, and
    otherwise returns rows_by_block's mapping."""
    from hal.errors import HalError

    rng = random.Random(seed)
    align = gemm.get_m_alignment_for_contiguous_layout()

    def reference(m_indices: torch.Tensor, groups: int):
        try:
            expect_in_range("op", "m_indices", m_indices, -1, groups, what=f"group ids (-1 for padding; rhs has G={groups} groups)",
                            fix="Each row's group must index a group of rhs.")
            gemm._check_contiguous_segments("op", m_indices)
        except HalError as error:
            return type(error), str(error)
        return gemm.rows_by_block(m_indices)

    for _ in range(200):
        groups, values = rng.randint(1, 4), []
        blocks = rng.choice([1, 2, 3, 4, 48])  # 48 blocks: more id changes than are checked one by one
        for _ in range(blocks):
            values += [rng.randint(-1, groups - 1)] * (count := rng.randint(0, align)) + [-1] * (align - count)
        for _ in range(rng.choice([0, 0, 1, 2])):
            values[rng.randrange(len(values))] = rng.randint(-2, groups)  # out of range too
        if rng.random() < 0.15:  # a well-formed segment of an id out of range
            start, count = rng.randrange(blocks) * align, rng.randint(1, align)
            values[start : start + align] = [rng.choice([groups, -2])] * count + [-1] * (align - count)
        if rng.random() < 0.1:
            values = values[:-1]  # M not a multiple of the alignment
        m_indices = torch.tensor(values, dtype=torch.int32)
        for off in ("lists", False, True):
            without_numpy(off)
            expected = reference(m_indices, groups)
            try:
                got = gemm.contiguous_rows("op", m_indices, groups)
            except HalError as error:
                got = (type(error), str(error))
            if isinstance(expected, torch.Tensor):
                assert isinstance(got, torch.Tensor) and got.dtype == torch.int32 and torch.equal(got, expected), (off, values)
            else:
                assert got == expected, (off, values)


def test_per_step_ints_keep_their_layout_and_are_still_checked(monkeypatch: pytest.MonkeyPatch):
    """An int an engine changes every step (the paged logits' max_context_len, the masked GEMMs'
    expected_m, the compressed logits' max_seqlen_k) does not make a new layout: the structural
    checks run once over many values. A value the checks refuse still raises after the layout was
    remembered, as does another type (a float, a bool) and the compressed mode's other bound."""
    from hal.conformance.catalogue import select_cases
    from hal.errors import HalError
    from hal.ops import gemm_bf16, indexer

    case = select_cases(quick=True, ops=["paged_mqa_logits"])[0]
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    runs = []
    real = indexer._check_paged_layouts
    monkeypatch.setattr(indexer, "_check_paged_layouts", lambda *a: runs.append(1) or real(*a))
    q, kv, weights, lens, table = (inputs[k] for k in ("q", "kv_cache", "weights", "context_lens", "block_table"))
    meta = hal.get_paged_mqa_logits_metadata(lens, kv.shape[1], 4)
    call = hal.fp8_fp4_paged_mqa_logits
    longest = int(lens.max())
    first = call(q, kv, weights, lens, table, meta, longest, False)
    indexer._PAGED_LAYOUTS.clear()
    runs.clear()
    for step in range(6):
        out = call(q, kv, weights, lens, table, meta, longest + step, False)
        assert out.shape[-1] == longest + step
        torch.testing.assert_close(out[..., :longest], first, equal_nan=True)
    assert len(runs) == 1
    for bad in (-1, float(longest), True):
        with pytest.raises(HalError, match="max_context_len|context_lens"):
            call(q, kv, weights, lens, table, meta, bad, False)
    with monkeypatch.context() as values_off:  # without value checks the layout's bucket alone refuses -1
        values_off.setenv("HAL_CHECK_VALUES", "0")
        call(q, kv, weights, lens, table, meta, longest + 9, False)
        with pytest.raises(HalError, match="max_context_len"):
            call(q, kv, weights, lens, table, meta, -1, False)

    # the masked GEMMs' expected_m (FP8 and BF16)
    lhs, rhs = _fp8_operands(4, 256, 256)
    masked_lhs = (lhs[0][None].expand(2, -1, -1).contiguous(), lhs[1][None].expand(2, -1, -1).contiguous())
    grouped_rhs = (rhs[0][None].expand(2, -1, -1).contiguous(), rhs[1][None].expand(2, -1, -1).contiguous())
    out = torch.empty(2, 4, 256, dtype=torch.bfloat16)
    masked_m = torch.tensor([4, 1], dtype=torch.int32)
    gemm._LAYOUTS.clear()
    for expected_m in range(1, 6):
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, out, masked_m, expected_m)
    assert len(gemm._LAYOUTS) == 1
    for bad in (0, -3, 2.0, True):
        with pytest.raises(HalError, match="expected_m"):
            hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(masked_lhs, grouped_rhs, out, masked_m, bad)
    a = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    b = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    d = torch.empty(2, 4, 32, dtype=torch.bfloat16)
    gemm_bf16._LAYOUTS.clear()
    for expected_m in range(1, 6):
        hal.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    assert len(gemm_bf16._LAYOUTS) == 1
    for bad in (0, 2.0, True):
        with pytest.raises(HalError, match="expected_m"):
            hal.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, bad)


def test_compressed_logits_width_keeps_its_layout_and_its_checks(monkeypatch: pytest.MonkeyPatch):
    """mqa_logits' max_seqlen_k: 0 (full) and > 0 (compressed) are different layouts (the latter
    refuses clean_logits), one layout for every positive width, a negative one refused."""
    from hal.errors import ArgumentError, HalError
    from hal.ops import indexer

    seq_len, seq_len_kv, heads, dim = 3, 40, 4, 32
    q = torch.randn(seq_len, heads, dim).to(torch.float8_e4m3fn)
    kv = (torch.randn(seq_len_kv, dim).to(torch.float8_e4m3fn), torch.rand(seq_len_kv) + 0.5)
    weights = torch.randn(seq_len, heads)
    start = torch.tensor([0, 5, 10], dtype=torch.int32)
    end = torch.tensor([20, 30, 40], dtype=torch.int32)
    runs = []
    real = indexer._check_mqa_layouts
    monkeypatch.setattr(indexer, "_check_mqa_layouts", lambda *a: runs.append(1) or real(*a))
    indexer._MQA_LAYOUTS.clear()
    full = hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=False)
    for width in (30, 31, 35, 40):
        out = hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=False, max_seqlen_k=width)
        assert out.shape == (seq_len, width)
        for i in range(seq_len):
            n = min(width, int(end[i] - start[i]))
            torch.testing.assert_close(out[i, :n], full[i, int(start[i]) : int(start[i]) + n])
    assert len(runs) == 2  # full, then compressed
    with pytest.raises(ArgumentError, match="clean_logits"):
        hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=True, max_seqlen_k=33)
    with pytest.raises(HalError, match="max_seqlen_k"):
        hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=False, max_seqlen_k=-2)
    # a tensor flag is no part of a key: its value is checked on every call
    hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=torch.tensor(False), max_seqlen_k=31)
    with pytest.raises(ArgumentError, match="clean_logits"):
        hal.fp8_mqa_logits(q, kv, weights, start, end, clean_logits=torch.tensor(True), max_seqlen_k=32)


def test_int_bucket_tells_the_bounds_apart():
    from hal.layouts import int_bucket

    assert int_bucket(5, 1) == int_bucket(10**9, 1) != int_bucket(0, 1) == int_bucket(-7, 1)
    assert len({int_bucket(v, 0, 1) for v in (-1, 0, 1, 2)}) == 3
    for other in (True, 1.0, None, "1"):
        assert int_bucket(other, 1) is other
    # a bucket is keyed apart from the int of the same value a caller might pass
    from hal.checks import signature

    assert signature(int_bucket(5, 1)) != signature(1) and signature(int_bucket(0, 1)) != signature(0)


def _odd_arguments(value: object) -> dict[str, object]:
    """Arguments no operator accepts in ``value``'s place, of the kinds a caller can pass by mistake."""
    import warnings

    if isinstance(value, torch.Tensor) and value.dim():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that sparse invariant checks are off, and that nested tensors are a prototype
            odd = {"sparse": torch.sparse_coo_tensor(torch.zeros(value.dim(), 0, dtype=torch.long), torch.empty(0, dtype=value.dtype), value.shape)}
            odd["nested"] = torch.nested.nested_tensor([value.float()])
        odd["0-d"] = value.reshape(-1)[0] if value.numel() else torch.zeros((), dtype=value.dtype)
        return odd
    if type(value) is int:
        return {"2**40": 2**40, "negative": -value - 1}
    return {}


def test_odd_arguments_anywhere_raise_typed_errors():
    """Every quick case, with each argument in turn replaced by a sparse, nested or 0-d tensor, or
    an int too large for the kernels' 32-bit sizes or negative: a typed HalError,
    never a raw error from inside hal (a stride, a data pointer or a reduction such a tensor does not
    have, an allocation of 2**40 columns) nor a crash (a nested tensor aborted the process inside
    the layout guard). Raw errors from the test cases' own code (reading a shape to build a
    schedule) are not hal's."""
    import traceback

    from hal.conformance.catalogue import select_cases
    from hal.errors import HalError

    raw = []
    tried = 0
    for case in select_cases(quick=True):
        if case.op.startswith("ep_") and case.op not in ("ep_pack", "ep_unpack", "ep_combine_reduce", "ep_dispatch_layout"):
            continue  # the multi-process EP cases: tests/test_ep_*.py
        inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
        for name, value in inputs.items():
            if name == "segments":  # the EP case's own parameter (how it splits its rows), not an argument
                continue
            for kind, odd in _odd_arguments(value).items():
                broken = dict(inputs)
                broken[name] = odd
                tried += 1
                try:
                    case.family.run(broken)
                except HalError:
                    pass
                except Exception as error:  # noqa: BLE001 - what the test looks for
                    frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
                    if any(part in path for path in frames for part in ("/ops/", "/hal/", "/backends/", "/ep/")) and "/conformance/" not in frames[-1]:
                        raw.append(f"{case.id} {name} <- {kind}: {type(error).__name__}: {error}"[:200])
    assert tried > 500 and not raw, "\n".join(raw)


@pytest.mark.parametrize("helper", [
    "get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor", "get_mn_major_tma_aligned_packed_ue8m0_tensor", "per_token_cast_to_fp8",
    "per_block_cast_to_fp8", "per_channel_cast_to_fp8", "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int",
    "per_token_cast_to_fp4", "transpose_packed_fp4", "cast_back_from_fp4",
])
def test_deep_gemm_helpers_refuse_odd_tensors_with_typed_errors(helper: str):
    """DeepGEMM's torch helpers (hal.compat.deep_gemm) are torch code: given a sparse, nested or
    0-d tensor, an int or None they raise a typed HalError naming the argument, not an error from
    deep inside torch."""
    import inspect

    import hal.compat.deep_gemm as deep_gemm
    from hal.errors import HalError

    function = getattr(deep_gemm, helper)
    needs_flag = sum(p.default is inspect.Parameter.empty for p in inspect.signature(function).parameters.values()) > 1
    odd = dict(_odd_arguments(torch.randn(64, 256)))
    odd.update({"an int": 5, "None": None})
    if helper == "ceil_to_ue8m0":  # elementwise: a 0-d tensor is a scale like any other
        del odd["0-d"]
    for kind, value in odd.items():
        with pytest.raises(HalError):
            function(value, False) if needs_flag else function(value)
    assert deep_gemm.per_custom_dims_cast_to_fp8(torch.randn(4, 8), (0,), False)[1].shape == (4,)
    with pytest.raises(HalError, match="dims"):
        deep_gemm.per_custom_dims_cast_to_fp8(torch.randn(4, 8), (2,), False)
