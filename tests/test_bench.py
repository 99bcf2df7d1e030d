"""hal bench: timings, fractions of measured peak, peers checked before timing, ratios, JSON."""

from __future__ import annotations

import json

import torch

from hal.bench.peaks import measured_peaks
from hal.bench.runner import bench, save_results
from hal.bench.work import work_of
from hal.cli import main
from hal.conformance.catalogue import select_cases


def test_peaks_are_measured_and_plausible():
    peaks = measured_peaks("cpu")
    assert 1e8 < peaks.copy_bytes_per_s < 1e13
    for dtype in ("float32", "bfloat16"):
        rate = peaks.matmul[dtype]
        assert 1e8 < peaks.flops_per_s(dtype) < 1e15
        assert rate.repeats >= 7 and rate.low <= rate.median <= rate.high  # median of 7+, with its spread


def test_work_model_counts_flops_and_bytes():
    case = select_cases(quick=True, ops=["gemm_fp8_nt"], patterns=["m7-*"])[0]
    import torch

    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    work = work_of(case.op, inputs)
    assert work.flops == 2 * 7 * 256 * 256
    assert work.bytes >= 7 * 256 + 256 * 256 + 2 * 7 * 256


def test_bench_times_backends_and_peers_and_flags_wrong_results(install_plugins):
    install_plugins({"wrong_scale": "wrong_scale"})
    cases = select_cases(quick=True, ops=["gemm_fp8_nt"], patterns=["m7-*"])
    report = bench(["reference", "wrong_scale"], cases, repeats=3)
    (record,) = report["cases"]
    by_name = {e["name"]: e for e in record["results"]}
    assert by_name["reference"]["median_s"] > 0
    assert 0 < by_name["reference"]["fraction_of_bound"] < 10
    assert "torch" in by_name["reference"]["speedup_vs"]
    assert by_name["torch"]["kind"] == "peer" and by_name["torch"]["formulation"]
    assert "median_s" not in by_name["wrong_scale"] and "wrong result" in by_name["wrong_scale"]["note"]
    assert report["peaks"]["cpu"]["copy_bytes_per_s"]["median"] > 0
    assert report["environment"]["torch"]


def test_save_and_cli_json(tmp_path, capsys):
    report = bench(["reference"], select_cases(quick=True, ops=["ep_dispatch_layout"])[:1], repeats=3)
    path = save_results(report, tmp_path)
    assert json.loads(path.read_text())["cases"][0]["op"] == "ep_dispatch_layout"
    assert main(["bench", "--backend", "reference", "--op", "per_token_cast_to_fp8", "--repeats", "3", "--json", "--no-peers"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {c["op"] for c in printed["cases"]} == {"per_token_cast_to_fp8"}


def test_every_catalogued_operator_has_a_work_model():
    import torch

    from hal.bench.work import work_of
    from hal.conformance.catalogue import select_cases

    for case in select_cases(quick=True):
        work = work_of(case.op, case.family.build(case.params, torch.Generator().manual_seed(case.seed)))
        assert work.bytes > 0 and work.flops >= 0, case.id


def test_the_caches_are_evicted_before_every_timed_run_and_only_then():
    """``before`` (the cache flush) runs once before each timed run of each contender, never during
    the warm-up, and outside the timed interval."""
    import time

    from hal.bench.timing import measure_interleaved

    events: list[str] = []

    def slow_flush() -> None:
        events.append("flush")
        time.sleep(0.01)

    timings = measure_interleaved([lambda: events.append("a"), lambda: events.append("b")], "cpu", warmup=2, repeats=7, before=slow_flush)
    assert events[:4] == ["a", "a", "b", "b"]  # warm-up, no flush
    assert events[4:] == ["flush", "a", "flush", "b"] * 7
    assert all(t.repeats == 7 and t.median_s < 0.005 for t in timings)  # the flush's 10 ms is not in the time


def test_each_timed_run_follows_an_untimed_run_of_its_own():
    """With a lead-in, a contender's timed run comes right after its own untimed run (then the
    flush), never straight after another contender's; only the timed runs are counted."""
    import time

    from hal.bench.timing import measure_interleaved

    events: list[str] = []

    def slow(name: str, seconds: float):
        def run() -> None:
            events.append(name)
            time.sleep(seconds)

        return run

    timings = measure_interleaved([slow("a", 0.0), slow("b", 0.004)], "cpu", warmup=1, repeats=5, before=lambda: events.append("flush"), lead_in=1)
    assert events[:2] == ["a", "b"]
    assert events[2:] == ["a", "flush", "a", "b", "flush", "b"] * 5
    assert timings[0].repeats == timings[1].repeats == 5 and timings[0].median_s < 0.002 <= timings[1].median_s

    # settle: before each contender's lead-in (untimed), after the other contender's timed run
    events.clear()
    measure_interleaved([slow("a", 0.0), slow("b", 0.0)], "cpu", warmup=0, repeats=3, lead_in=1, settle=lambda: events.append("settle"))
    assert events == ["settle", "a", "a", "settle", "b", "b"] * 3


def test_bench_leads_in_on_its_own_input_set():
    """hal bench's lead-in takes the next rotated input set, so a timed run's set was last read a
    whole rotation earlier (its inputs come from memory, not from the lead-in's caching)."""
    import torch

    from hal.bench import runner

    inputs = {"x": torch.zeros(1)}
    used: list[tuple[str, int]] = []

    def contender(name: str) -> runner._Contender:
        def on_copy(copy: dict) -> object:
            return lambda: used.append((name, id(copy["x"])))

        return runner._Contender(name, "backend", on_copy(inputs), on_copy=on_copy)

    sets = 4
    rotated = runner._rotated([contender("a"), contender("b")], inputs, sets)
    runner.measure_interleaved([c.call for c in rotated], "cpu", warmup=0, repeats=3, lead_in=runner.LEAD_IN)
    order = {x: i for i, x in enumerate(dict.fromkeys(x for _, x in used))}
    assert runner.LEAD_IN >= 1 and len(order) == sets
    per_call = runner.LEAD_IN + 1
    assert [name for name, _ in used] == (["a"] * per_call + ["b"] * per_call) * 3
    assert [order[x] for _, x in used] == [k % sets for k in range(len(used))]  # the k-th call of any contender takes set k mod sets


def test_cache_flush_outgrows_the_last_level_cache_and_is_reported(monkeypatch):
    from hal.bench import cache

    flush = cache.cache_flush("cpu")
    assert flush.bytes >= max(2 * cache.last_level_cache_bytes(), 64 << 20)
    flush()
    assert flush._buffer is not None and flush._buffer.numel() * 4 == flush.bytes
    flush.release()
    assert flush.to_json()["bytes"] == flush.bytes and "rotated" in flush.to_json()["policy"]
    assert cache.cache_flush("cpu", hot=True).to_json()["policy"].startswith("hot")
    assert cache.cache_flush("xpu").to_json()["policy"] == "not flushed"
    assert [cache._size_bytes(t) for t in ("32768K\n", "1M", "512", "junk")] == [32 << 20, 1 << 20, 512, 0]
    monkeypatch.setattr(cache, "last_level_cache_bytes", lambda: 1 << 30)
    assert cache.cache_flush("cpu").bytes == 2 << 30
    report = bench(["reference"], select_cases(quick=True, ops=["per_token_cast_to_fp8"])[:1], repeats=3, hot_cache=True)
    assert report["caches"]["cpu"]["policy"].startswith("hot")
    assert report["cases"][0]["caches"] == {"input_sets": 1, "flushed": False, "settled": False}


def test_input_sets_fill_the_target_within_the_budget():
    from hal.bench.cache import MAX_INPUT_SETS, CacheFlush, input_sets

    cpu = CacheFlush("cpu", 64 << 20)
    assert input_sets(cpu, 15 << 20, None) == (5, False)  # 5 x 15 MiB >= 64 MiB
    assert input_sets(cpu, 64 << 20, None) == (1, False)  # one set evicts itself
    assert input_sets(cpu, 1 << 10, None) == (MAX_INPUT_SETS, False)  # tiny: capped, never flushed
    assert input_sets(cpu, 15 << 20, 30 << 20) == (1, True)  # 4 more copies do not fit: flush instead
    assert input_sets(cpu, 15 << 20, 80 << 20, extra_per_set=10 << 20) == (1, True)  # the peers' copies count
    assert input_sets(CacheFlush("cpu", 0, hot=True), 15 << 20, None) == (1, False)
    assert input_sets(CacheFlush("cuda", 256 << 20), 15 << 20, None) == (1, True)
    assert input_sets(CacheFlush("xpu", 0), 15 << 20, None) == (1, False)


def test_rotated_contenders_take_their_copies_in_turn():
    """The k-th run of any contender takes input set k mod sets: a set is read again only after every
    other set was, whichever contenders ran in between."""
    from hal.bench.runner import _Contender, _rotated

    seen: list[tuple[str, int]] = []
    inputs = {"x": torch.zeros(3), "n": 5}

    def contender(name: str) -> _Contender:
        def on_copy(copy):
            assert copy["x"] is not inputs["x"] and copy["n"] == 5 and torch.equal(copy["x"], inputs["x"])
            return lambda: seen.append((name, id(copy["x"])))
        return _Contender(name, "backend", lambda: seen.append((name, id(inputs["x"]))), on_copy=on_copy)

    rotated = _rotated([contender("a"), contender("b")], inputs, 3)
    for _ in range(6):
        for c in rotated:
            c.call()
    order = [x for _, x in seen]
    assert len(set(order)) == 3 and order[0] == id(inputs["x"])
    assert all(order[k] == order[k % 3] for k in range(len(order)))  # a set comes back every third run
    assert {x for name, x in seen if name == "a"} == {x for name, x in seen if name == "b"} == set(order)  # every contender cycles
    single = [contender("a")]
    assert _rotated(single, inputs, 1) is single


def test_bench_rotates_the_inputs_of_a_cpu_case(monkeypatch):
    """A case whose inputs are smaller than the target is timed on several input sets, no flush; the
    record says so, and the results are still checked and timed."""
    from hal.bench import cache

    monkeypatch.setattr(cache, "last_level_cache_bytes", lambda: 1 << 20)  # target: the 64 MiB floor
    case = select_cases(quick=True, ops=["gemm_fp8_nt"], patterns=["m7-*"])[0]
    report = bench(["reference"], [case], repeats=3)
    (record,) = report["cases"]
    assert record["caches"]["input_sets"] == cache.MAX_INPUT_SETS and not record["caches"]["flushed"]
    assert record["caches"]["settled"]  # contenders take turns: each starts after a read of the target's bytes
    assert {e["name"] for e in record["results"] if "median_s" in e} >= {"reference", "torch"}
