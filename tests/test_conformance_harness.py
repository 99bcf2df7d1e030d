"""The conformance harness itself: it passes the reference, catches wrong backends, survives
hangs, crashes and exceptions, and writes readable reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from html.parser import HTMLParser

import pytest
import torch

from hal.cli import main
from hal.conformance.catalogue import all_cases, select_cases
from hal.conformance.metrics import TOLERANCES, Tolerance, cos_diff
from hal.conformance.runner import run_backend
from hal.operator import OPERATORS

PLUGINS_DIR = Path(__file__).parent / "plugins"
WRONG = {"wrong_page": "wrong_page", "wrong_scale": "wrong_scale", "nan_backend": "nan_backend", "misbehaving": "misbehaving"}


@pytest.fixture
def wrong_backends(install_plugins, tmp_path, monkeypatch):
    install_plugins(WRONG)
    # Child processes (--isolate) must discover the same plugins.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(PLUGINS_DIR), os.environ.get("PYTHONPATH", "")]))


def test_catalogue_covers_every_operator_in_both_tiers():
    quick = {c.op for c in select_cases(quick=True)}
    full = {c.op for c in all_cases()}
    assert quick == full == set(OPERATORS)
    assert len(all_cases()) > 2 * len(select_cases(quick=True))


def test_every_output_has_a_stated_tolerance_from_the_anchor():
    out = TOLERANCES[("mla_decode", "out")]
    assert (out.metric, out.threshold) == ("cos_diff", 1e-5)
    assert (out.element.atol, out.element.rtol) == (8e-4, 2.01 / 128)  # FlashMLA HEAD's per-element pair
    lse = TOLERANCES[("mla_decode", "lse")].element
    assert (lse.atol, lse.rtol) == (1e-6, 8.01 / 65536)
    assert TOLERANCES[("gemm_fp8_nt", "out")].threshold == 1e-3
    assert "FlashMLA" in TOLERANCES[("mla_decode", "lse")].source and "DeepGEMM" in TOLERANCES[("gemm_fp8_nt", "out")].source


def test_nan_never_passes():
    tol = TOLERANCES[("gemm_fp8_nt", "out")]
    assert not tol.passes(float("nan"))
    import torch

    x = torch.tensor([1.0, float("nan")])
    assert not tol.passes(cos_diff(x, torch.tensor([1.0, 1.0])))


@pytest.mark.parametrize("exponent", [-60, -30, 0, 30, 60])
def test_cos_diff_and_the_element_bound_judge_any_scale_alike(exponent: int):
    """A correctly rounded result passes and one wrong element fails whatever the outputs' scale:
    the anchors' 1e-12 guard must not fail outputs near 1e-8, nor ulp() ask subnormals for more
    precision than their format has."""
    from hal.conformance.case import judge

    generator = torch.Generator().manual_seed(5)
    want = torch.randn(64, 64, generator=generator, dtype=torch.float64) * 2.0**exponent
    got = want.float().to(torch.bfloat16)
    assert cos_diff(got, want) == pytest.approx(cos_diff(got.double() * 2.0**-exponent, want * 2.0**-exponent), rel=1e-12, abs=1e-18)
    assert all(m.passed for m in judge("gemm_fp8_nt", "out", got, want.float()))
    wrong = got.clone()
    wrong[7, 9] = -wrong[7, 9] * 4
    assert not all(m.passed for m in judge("gemm_fp8_nt", "out", wrong, want.float()))


def test_cos_diff_of_float64_subnormals_is_defined():
    tiny = torch.tensor([5e-324, 1e-310], dtype=torch.float64)
    assert cos_diff(tiny, tiny) == pytest.approx(0.0, abs=1e-12)


def test_ulp_below_the_normals_is_the_subnormal_spacing():
    from hal.conformance.metrics import ulp

    tiny = torch.tensor([6.6e-42, 1e-40, 2.0**-126, 1.0])
    assert ulp(tiny, 23).tolist() == [2.0**-149, 2.0**-149, 2.0**-149, 2.0**-23]
    assert ulp(tiny, 7).tolist() == [2.0**-133, 2.0**-133, 2.0**-133, 2.0**-7]
    assert ulp(torch.tensor([2.0**-9, 1.0]), 3).tolist() == [2.0**-9, 2.0**-3]  # e4m3's subnormals are 2^-9 apart


def test_reference_passes_the_quick_suite():
    results = run_backend("reference", select_cases(quick=True))
    failed = [(r.case_id, r.status, r.reason) for r in results if not r.passed]
    assert not failed
    assert all(r.measurements for r in results)


def test_off_by_one_page_is_caught(wrong_backends):
    results = run_backend("wrong_page", select_cases(quick=True, ops=["mla_decode"]))
    assert results and all(r.status == "fail" for r in results), [(r.case_id, r.status) for r in results]


def test_wrong_scale_layout_is_caught(wrong_backends):
    # With one K block the first block's scale is the right one; every multi-block case must fail.
    cases = [c for c in select_cases(quick=True, ops=["gemm_fp8_nt"]) if c.params["k"] > 128]
    results = run_backend("wrong_scale", cases)
    # A version-1 plugin: the version-2 cases that need float32 out or per-token RHS scales never reach it.
    ran = [r for r in results if r.status != "unsupported"]
    assert len(ran) >= 5 and all(r.status == "fail" for r in ran), [(r.case_id, r.status) for r in results]
    assert all(r.worst().value > 1e-3 for r in ran), "far off, not within rounding"
    needs_v2 = {c.id for c in cases if c.params.get("fp32") or c.params.get("accumulate") or c.params.get("recipe") == "token"}
    assert {r.case_id for r in results if r.status == "unsupported"} == needs_v2


def test_nan_and_unwritten_rows_are_caught(wrong_backends):
    # The MLA backend plants its NaN in lse[0, 0, 0]: for an empty first sequence that is a wrong +inf.
    expected_notes = {"gemm_fp8_nt": ("NaN",), "mla_decode": ("NaN", "+inf"), "m_grouped_gemm_fp8_nt_masked": ("NaN",)}
    for op, notes in expected_notes.items():
        results = [r for r in run_backend("nan_backend", select_cases(quick=True, ops=[op])) if r.status != "unsupported"]  # v2-only cases
        assert results and all(r.status == "fail" for r in results), op
        assert all(any(n in r.reason for n in notes) for r in results), [r.reason for r in results]


def test_exceptions_are_errors_missing_operators_unsupported_and_the_suite_goes_on(wrong_backends):
    cases = select_cases(quick=True, ops=["per_token_cast_to_fp8", "mla_decode", "ep_dispatch_layout"])
    results = {r.case_id: r for r in run_backend("misbehaving", cases)}
    assert len(results) == len(cases)
    for case in cases:
        r = results[case.id]
        if case.op == "per_token_cast_to_fp8":
            assert r.status == "error" and "out of registers" in r.reason
        elif case.op == "mla_decode":
            assert r.status == "unsupported" and "does not implement mla_decode" in r.reason
        else:
            assert r.status == "pass"


def test_hang_times_out_in_process(wrong_backends):
    cases = select_cases(quick=True, ops=["gemm_fp8_nt"])[:1] + select_cases(quick=True, ops=["ep_dispatch_layout"])[:1]
    results = run_backend("misbehaving", cases, timeout=2.0)
    assert [r.status for r in results] == ["timeout", "pass"]


def test_isolated_run_survives_crash_and_hang(wrong_backends):
    cases = (
        select_cases(quick=True, ops=["m_grouped_gemm_fp8_nt_masked"])[:1]
        + select_cases(quick=True, ops=["ep_dispatch_layout"])[:1]
        + select_cases(quick=True, ops=["gemm_fp8_nt"])[:1]
        + select_cases(quick=True, ops=["ep_dispatch_layout"])[1:2]
    )
    results = run_backend("misbehaving", cases, timeout=15.0, isolate=True)
    assert [r.status for r in results] == ["crash", "pass", "timeout", "pass"], [(r.status, r.reason) for r in results]
    assert "SIGABRT" in results[0].reason


class _TableCells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self.classes.append(dict(attrs).get("class", ""))


def test_cli_reports_and_exit_code(wrong_backends, tmp_path, capsys):
    code = main(["conformance", "--backend", "reference", "--backend", "wrong_scale", "--op", "gemm_fp8_nt", "--report", str(tmp_path / "r")])
    assert code == 1, "a failing backend makes the run fail"
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["summary"]["reference"]["pass"] == report["summary"]["reference"]["total"] > 0
    summary = report["summary"]["wrong_scale"]
    # the K=128 case is right; the v2 cases needing float32 out or per-token RHS scales are not its contract
    assert summary["fail"] == summary["total"] - 1 - summary["unsupported"] and summary["unsupported"] == 3
    assert report["environment"]["torch"] and report["mode"] == "quick"
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| wrong_scale |" in markdown and "cos_diff" in markdown
    cells = _TableCells()
    cells.feed((tmp_path / "r" / "report.html").read_text())
    assert cells.classes.count("fail") == report["summary"]["wrong_scale"]["fail"]
    assert cells.classes.count("pass") == report["summary"]["reference"]["pass"] + report["summary"]["wrong_scale"]["pass"]
    assert main(["conformance", "--backend", "reference", "--op", "gemm_fp8_nt"]) == 0


def test_cli_narrowing_and_errors(capsys):
    assert main(["conformance", "--list", "--case", "*sq2*"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed and all(i.startswith("mla_decode") and "sq2" in i for i in listed)
    assert main(["conformance", "--backend", "cuda"]) == 2
    assert "unavailable" in capsys.readouterr().err
    assert main(["conformance", "--case", "no-such-case"]) == 2


def test_pytest_plugin_runs_the_catalogue():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "hal.conformance", "--hal-backend=reference", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{len(select_cases(quick=True))} passed" in result.stdout


def test_unsupported_operators_fail_only_with_require_all(wrong_backends, capsys):
    args = ["conformance", "--backend", "wrong_page", "--op", "gemm_fp8_nt"]
    assert main(args) == 0
    cases = len(select_cases(quick=True, ops=["gemm_fp8_nt"]))
    pattern = rf"wrong_page\s*│\s*\S*\s*│\s*0/0\s*│\s*0\s*│\s*{cases}\s*│"
    assert re.search(pattern, capsys.readouterr().out), "every case not implemented, none failed"
    assert main(args + ["--require-all"]) == 1


@pytest.mark.parametrize(
    "op, what",
    [
        ("gemm_fp8_nt", "one element off by one"),
        ("mla_decode", "one head's row from its neighbour, or one page from the wrong block"),
        ("m_grouped_gemm_fp8_nt_contiguous", "one expert's group scaled by 1.02"),
        ("mla_decode_v2", "one head's row from its neighbour (V3.2 decode)"),
        ("mla_sparse_prefill", "one head's row from its neighbour (sparse prefill)"),
        ("mqa_logits", "one logit 1% off"),
        ("paged_mqa_logits", "one page read from the wrong block"),
        ("gemm_bf16_nt", "one element off by 1% of the largest output"),
        ("m_grouped_gemm_bf16_nt_masked", "expert 0's rows through expert 1's weights"),
    ],
)
def test_one_wrong_element_row_page_or_group_fails_conformance(op, what, install_plugins):
    install_plugins({"subtly_wrong": "subtly_wrong"})
    results = [r for r in run_backend("subtly_wrong", select_cases(quick=True, ops=[op])) if r.status != "unsupported"]  # v2-only cases
    assert results and all(r.status == "fail" for r in results), (what, [(r.case_id, r.status) for r in results])
    # The per-element bound catches it; for the GEMMs the anchors' global metric alone would not.
    for r in results:
        element = next(m for m in r.measurements if m.metric == "element_excess" and not m.passed)
        assert "element [" in element.note and "its bound" in element.note
    if op in ("gemm_fp8_nt", "m_grouped_gemm_fp8_nt_contiguous"):  # the FP8 GEMMs' loose global threshold (1e-3)
        assert all(m.passed for r in results for m in r.measurements if m.metric == "cos_diff"), "hidden from the global metric"


def test_a_cache_quantiser_that_clamps_amax_instead_of_the_scale_fails(install_plugins):
    install_plugins({"subtly_wrong": "subtly_wrong"})
    results = run_backend("subtly_wrong", select_cases(quick=True, ops=["quantize_mla_kv_cache"]))
    assert results and all(r.status == "fail" for r in results), [(r.case_id, r.status, r.reason) for r in results]


def test_a_truncating_bf16_gemm_fails_where_rounding_to_nearest_passes():
    import torch

    from hal.conformance.case import judge

    exact = torch.tensor([1.00390625 + 2**-12, 3.0, -7.5], dtype=torch.float32)  # the first needs rounding
    nearest = exact.to(torch.bfloat16)
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(nearest, truncated)
    assert all(m.passed for m in judge("gemm_fp8_nt", "out", nearest, exact))
    assert not all(m.passed for m in judge("gemm_fp8_nt", "out", truncated, exact))


def test_a_backend_that_prints_to_stdout_cannot_corrupt_an_isolated_run(wrong_backends):
    cases = select_cases(quick=True, ops=["per_block_cast_to_fp8", "ep_dispatch_layout"])
    results = run_backend("misbehaving", cases, isolate=True, timeout=120)
    assert [r.case_id for r in results] == [c.id for c in cases]
    assert all(r.passed for r in results), [(r.case_id, r.status, r.reason) for r in results]
