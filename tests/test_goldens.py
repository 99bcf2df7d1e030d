"""Golden vectors: the shipped set pins the reference; recording, verification and tampering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hal.cli import main
from hal.conformance.catalogue import select_cases
from hal.conformance.golden import GoldenError, load_goldens, record
from hal.conformance.runner import run_backend
from hal.operator import OPERATORS

SHIPPED = Path(__file__).resolve().parents[1] / "goldens" / "reference-cpu"


def _recorded(tmp_path: Path) -> Path:
    directory = tmp_path / "goldens"
    record("reference", select_cases(quick=True, ops=["per_token_cast_to_fp8"])[:1], directory)
    return directory


def test_shipped_goldens_cover_every_operator_and_verify():
    manifest, goldens = load_goldens(SHIPPED)
    assert manifest["recorded_with"]["backend"] == "reference"
    assert {case_id.split("/")[0] for case_id in goldens} == set(OPERATORS)


def test_reference_still_matches_its_shipped_goldens():
    _, goldens = load_goldens(SHIPPED)
    cases = [c for c in select_cases(quick=False) if c.id in goldens]
    results = run_backend("reference", cases, golden_dir=SHIPPED)
    assert len(results) == len(goldens)
    assert all(r.passed for r in results), [(r.case_id, r.reason) for r in results if not r.passed]


def test_record_then_check_round_trip(tmp_path):
    cases = select_cases(quick=True, ops=["gemm_fp8_nt", "ep_dispatch_layout"])[:3]
    manifest_path = record("reference", cases, tmp_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "unihal-golden/1" and manifest["recorded_with"]["environment"]["torch"]
    assert all(len(entry["sha256"]) == 64 for entry in manifest["cases"].values())
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))
    assert all(r.passed for r in run_backend("reference", cases, golden_dir=tmp_path))


def test_tampered_golden_is_rejected(tmp_path):
    cases = select_cases(quick=True, ops=["per_token_cast_to_fp8"])[:1]
    record("reference", cases, tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(GoldenError, match="was altered"):
        load_goldens(tmp_path)


def test_missing_manifest_says_how_to_record(tmp_path):
    with pytest.raises(GoldenError, match="hal conformance record"):
        load_goldens(tmp_path)


def test_case_without_golden_is_an_error_not_a_reference_check(tmp_path):
    recorded = select_cases(quick=True, ops=["per_token_cast_to_fp8"])[:1]
    record("reference", recorded, tmp_path)
    other = select_cases(quick=True, ops=["per_block_cast_to_fp8"])[:1]
    (result,) = run_backend("reference", other, golden_dir=tmp_path)
    assert result.status == "error" and "no golden recorded" in result.reason


def test_wrong_backend_fails_against_goldens(install_plugins):
    install_plugins({"wrong_scale": "wrong_scale"})
    assert main(["conformance", "--backend", "wrong_scale", "--golden", str(SHIPPED), "--op", "gemm_fp8_nt"]) == 1
    assert main(["conformance", "--backend", "reference", "--golden", str(SHIPPED)]) == 0


def test_cli_record(tmp_path, capsys):
    assert main(["conformance", "record", "--backend", "reference", "--out", str(tmp_path / "g"), "--quick", "--op", "ep_dispatch_layout"]) == 0
    assert "Recorded 4 case(s)" in capsys.readouterr().out
    assert main(["conformance", "--golden", str(tmp_path / "g"), "--list"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m, d: m["cases"][next(iter(m["cases"]))].__setitem__("file", "../../../../etc/passwd"), "plain *.safetensors name"),
        (lambda m, d: m["cases"][next(iter(m["cases"]))].__setitem__("file", "/etc/passwd"), "plain *.safetensors name"),
        (lambda m, d: m["cases"][next(iter(m["cases"]))].__setitem__("file", "../sibling/x.safetensors"), "plain *.safetensors name"),
        (lambda m, d: m["cases"][next(iter(m["cases"]))].pop("sha256"), "missing 'sha256'"),
        (lambda m, d: m["cases"][next(iter(m["cases"]))].__setitem__("file", 7), "'file' is a int"),
        (lambda m, d: m.__setitem__("cases", []), "'cases' must be an object"),
    ],
)
def test_malformed_or_escaping_manifests_are_golden_errors(tmp_path, mutate, message):
    directory = _recorded(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    mutate(manifest, directory)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GoldenError, match=re.escape(message)):
        load_goldens(directory)


def test_a_truncated_manifest_is_a_golden_error(tmp_path):
    directory = _recorded(tmp_path)
    text = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(GoldenError, match="not valid JSON"):
        load_goldens(directory)


def test_a_link_leading_out_of_the_directory_is_refused(tmp_path):
    directory = _recorded(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(iter(manifest["cases"].values()))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((directory / entry["file"]).read_bytes())
    (directory / entry["file"]).unlink()
    (directory / entry["file"]).symlink_to(outside)
    with pytest.raises(GoldenError, match="leads outside"):
        load_goldens(directory)
