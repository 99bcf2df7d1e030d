"""hal bench tells the truth: fair peers checked against the reference, a memory budget that skips
instead of being OOM-killed, --case filtering the EP cases too, a results JSON that says where and
how it was measured, and the plot beside it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hal.bench.formulation import choose_fastest
from hal.bench.memory import MemoryBudget, parse_budget
from hal.bench.peers_mla import MLA_FORMULATIONS
from hal.bench.runner import _check, _device_inputs, bench
from hal.cli import main
from hal.conformance.case import copied_to, on_cpu
from hal.conformance.catalogue import select_cases

SMALL_GEMM = {"op": "gemm_fp8_nt", "case": "m7-*"}


def _cases(op: str, pattern: str) -> list:
    return select_cases(quick=True, ops=[op], patterns=[pattern])


@pytest.mark.parametrize("pattern", ["*sk2_130_77-bf16", "*sk1_0_70-bf16", "*sk129_5_64-fp16"])
def test_every_fp32_mla_formulation_agrees_with_the_reference(pattern):
    """The fp32 formulations pass the conformance check on out and lse (causal s_q=2, empty and
    blind rows, fp16); whichever is chosen is correct by construction."""
    (case,) = _cases("mla_decode", pattern)
    inputs = _device_inputs(case, "cpu")
    expected = on_cpu(case.family.expect(copied_to(inputs, "cpu")))
    for formulation in MLA_FORMULATIONS:
        outputs = formulation.prepare(inputs).outputs()
        assert set(outputs) == {"out", "lse"}
        why = _check(case, outputs, expected, inputs)
        if "fp32" in formulation.name:
            assert why == "", f"{formulation.name}: {why}"


def test_the_v32_decode_peer_agrees_with_the_reference_on_every_quick_case():
    """Sparse and dense modes, the FP8, bf16 and MODEL1 caches (poisoned where nobody looks), sinks,
    topk_length, the extra cache, duplicates: the torch peer of mla_decode_v2 passes conformance."""
    from hal.bench.peers_mla_v2 import MLA_V2_FORMULATIONS

    cases = select_cases(quick=True, ops=["mla_decode_v2"])
    assert any("m1" in case.id for case in cases) and any("dense" in case.id for case in cases)
    for case in cases:
        inputs = _device_inputs(case, "cpu")
        expected = on_cpu(case.family.expect(copied_to(inputs, "cpu")))
        for formulation in MLA_V2_FORMULATIONS:
            assert _check(case, formulation.prepare(inputs).outputs(), expected, inputs) == "", (case.id, formulation.name)


def test_mla_peer_is_the_fastest_correct_formulation_and_says_which():
    (record,) = bench(["reference"], _cases("mla_decode", "*sk2_130_77-bf16"), repeats=3)["cases"]
    torch_peer = next(e for e in record["results"] if e["name"] == "torch")
    assert torch_peer["kind"] == "peer" and "median_s" in torch_peer, torch_peer["note"]
    (peer,) = record["peers"]
    assert torch_peer["formulation"] == peer["formulation"]
    statuses = {t["formulation"]: t["status"] for t in peer["formulations"]}
    assert statuses[peer["formulation"]] == "chosen"
    assert set(statuses.values()) <= {"chosen", "slower", "wrong", "over budget", "error"}
    chosen_trial = next(t["trial_median_s"] for t in peer["formulations"] if t["status"] == "chosen")
    assert all(t["trial_median_s"] >= chosen_trial for t in peer["formulations"] if t["status"] == "slower")


def test_a_formulation_over_the_budget_is_not_prepared():
    (case,) = _cases("mla_decode", "*sk2_130_77-bf16")
    inputs = _device_inputs(case, "cpu")
    choice = choose_fastest(MLA_FORMULATIONS, inputs, "cpu", lambda outputs: "", room_bytes=0)
    assert choice.prepared is None and {t["status"] for t in choice.tried} == {"over budget"}


def test_a_case_over_the_memory_budget_is_skipped_with_the_reason():
    report = bench(["reference"], _cases(SMALL_GEMM["op"], SMALL_GEMM["case"]), repeats=3, budget=MemoryBudget(limit_bytes=4096))
    (record,) = report["cases"]
    assert record["results"] == [] and "exceeds the memory budget" in record["skipped"] and "--memory-budget" in record["skipped"]
    assert record["memory_estimate"]["total"] > 4096
    assert report["memory_budget"]["limit_bytes"] == 4096


@pytest.mark.parametrize("text, expected", [("50%", (None, 0.5)), ("8G", (8 * 2**30, 0.0)), ("512M", (512 * 2**20, 0.0)), ("1.5", (int(1.5 * 2**30), 0.0))])
def test_memory_budget_flag_forms(text, expected):
    assert parse_budget(text) == expected


def test_memory_budget_flag_rejects_nonsense():
    for text in ("0", "150%", "-1G"):
        with pytest.raises(ValueError):
            parse_budget(text)


class _EpCalls:
    def __init__(self):
        self.calls = []

    def __call__(self, world_size, backend, **config):
        from hal.ep.bench import CASES

        self.calls.append((world_size, backend))
        return [{"case": c, "world_size": world_size, "backend": backend or "auto", "bytes_per_rank": 1.0, "median_s": 1.0, "bytes_per_s_per_rank": 1.0,
                 "all_to_all_median_s": 1.0, "ratio_to_all_to_all": 1.0} for c in CASES]


@pytest.fixture
def ep_calls(monkeypatch):
    import hal.ep.bench

    calls = _EpCalls()
    monkeypatch.setattr(hal.ep.bench, "run", calls)
    return calls


def test_case_filter_does_not_start_the_ep_benchmark(ep_calls, capsys):
    """The issue: --case selecting GEMM cases still spawned 4 EP ranks."""
    assert main(["bench", "--backend", "reference", "--case", SMALL_GEMM["case"], "--repeats", "3", "--no-peers", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert ep_calls.calls == [] and "ep" not in report
    assert {c["op"] for c in report["cases"]} == {"gemm_fp8_nt"}


def test_case_filter_selects_ep_cases_alone(ep_calls, capsys):
    assert main(["bench", "--backend", "reference", "--case", "ep_combine/*", "--repeats", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(ep_calls.calls) == 1 and report["cases"] == []
    assert [r["case"] for r in report["ep"]] == ["ep_combine/bf16"]


def test_results_json_says_where_and_how_it_was_measured(capsys):
    assert main(["bench", "--backend", "reference", "--op", SMALL_GEMM["op"], "--case", SMALL_GEMM["case"], "--repeats", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"cpu", "cores", "memory_bytes", "memory_available_bytes"} <= set(report["machine"])
    assert {"python", "torch", "triton", "pyopencl", "hal"} <= set(report["versions"])
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["load"]) == {"start", "end"} and "1min" in report["load"]["start"]
    peaks = report["peaks"]["cpu"]
    for rate in [peaks["copy_bytes_per_s"], *peaks["matmul_flops_per_s"].values()]:
        assert rate["low"] <= rate["median"] <= rate["high"] and rate["repeats"] >= 7
    assert set(peaks["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    assert "bfloat16" in report["bounds"]
    (record,) = report["cases"]
    assert record["work"]["compute_dtype"] == "bfloat16"  # FP8 operands: the bf16 matmul peak bounds them
    by_name = {e["name"]: e for e in record["results"]}
    backend, peer = by_name["reference"], by_name["torch"]
    for entry in (backend, peer):
        assert {"median_s", "min_s", "max_s", "fraction_of_bound", "bound", "ratio_to_peer"} <= set(entry)
    assert backend["ratio_to_peer"] == pytest.approx(peer["median_s"] / backend["median_s"])
    assert peer["formulation"] == record["peers"][0]["formulation"]


def test_save_writes_the_plot_beside_the_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["bench", "--backend", "reference", "--op", SMALL_GEMM["op"], "--case", SMALL_GEMM["case"], "--repeats", "3", "--save", str(tmp_path)]) == 0
    (saved,) = tmp_path.glob("*.json")
    png = saved.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "Plot" in capsys.readouterr().out


def test_without_matplotlib_the_plot_says_how_to_get_it(monkeypatch, tmp_path):
    from hal.bench.plot import PlotUnavailableError, write_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotUnavailableError, match=r"pip install 'unihal\[bench\]'"):
        write_plot({"cases": []}, tmp_path / "x.png")
