"""Certificates: written by hal certify, content-addressed, read by selection under
HAL_REQUIRE_CERTIFIED=1, stale when the backend's identity or contracts change."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

import hal
from hal import certificate, registry, selection
from hal.cli import main
from hal.conformance.catalogue import select_cases
from hal.conformance.runner import run_backend


@pytest.fixture
def certs(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    certificate.reload()
    selection.clear_cache()
    yield tmp_path
    certificate.reload()
    selection.clear_cache()


def _certify(name: str, ops: list[str]) -> certificate.Certificate:
    results = run_backend(name, select_cases(quick=True, ops=ops))
    cert = certificate.build(name, results, "quick")
    certificate.save(cert)
    selection.clear_cache()
    return cert


def test_round_trip_and_tampering(certs):
    cert = _certify("reference", ["per_token_cast_to_fp8"])
    path = certificate.certificates_dir() / "reference.json"
    loaded = certificate.load(path)
    assert loaded.sha256 == cert.sha256 and loaded.certified_ops() == {"per_token_cast_to_fp8"}
    entry = loaded.data["operators"]["per_token_cast_to_fp8"]
    assert entry["contract"] == {"version": 1, "features": []} and all(c["status"] == "pass" for c in entry["cases"].values())
    payload = json.loads(path.read_text())
    payload["operators"]["per_token_cast_to_fp8"]["cases"][next(iter(entry["cases"]))]["status"] = "fail"
    path.write_text(json.dumps(payload))
    with pytest.raises(certificate.CertificateError, match="altered"):
        certificate.load(path)


def test_selection_requires_a_certificate_for_auto_selection(certs, install_plugins, monkeypatch, caplog):
    install_plugins({"narrow": "partial_features"})
    x = torch.randn(4, 4, 32).to(torch.float8_e4m3fn)
    assert hal.select("mqa_logits", "cpu").backend.name == "narrow"  # the highest priority
    monkeypatch.setenv(certificate.ENV_REQUIRE, "1")
    chosen = hal.select("mqa_logits", "cpu")
    assert chosen.backend.name != "narrow" and "narrow" in chosen.reason
    _certify("narrow", ["mqa_logits"])
    assert certificate.status(hal.get_backend("narrow"), "mqa_logits") == "certified"
    assert hal.select("mqa_logits", "cpu").backend.name == "narrow"
    # A backend the user names runs even when uncertified for the operator, with a warning.
    monkeypatch.setenv("HAL_BACKEND", "narrow")
    with caplog.at_level(logging.WARNING, logger="hal"):
        assert hal.select("mla_decode_v2", "cpu", features={"sparse"}).backend.name == "narrow"
    assert "not certified" in caplog.text
    del x


def test_a_changed_device_identity_makes_the_certificate_stale(certs, install_plugins, monkeypatch):
    install_plugins({"narrow": "partial_features"})
    cert = _certify("narrow", ["mqa_logits"])
    data = json.loads(json.dumps(cert.data))
    data["backend"]["device"] = "another GPU"
    certificate.save(certificate.Certificate(data, certificate._sha(data)))
    backend = hal.get_backend("narrow")
    assert certificate.status(backend, "mqa_logits") == "stale (device changed)"
    monkeypatch.setenv(certificate.ENV_REQUIRE, "1")
    selection.clear_cache()
    assert hal.select("mqa_logits", "cpu").backend.name != "narrow"


def test_a_changed_contract_makes_the_certificate_stale(certs, install_plugins):
    install_plugins({"narrow": "partial_features"})
    cert = _certify("narrow", ["mqa_logits"])
    data = json.loads(json.dumps(cert.data))
    data["operators"]["mqa_logits"]["contract"]["version"] = 0
    certificate.save(certificate.Certificate(data, certificate._sha(data)))
    assert certificate.status(hal.get_backend("narrow"), "mqa_logits").startswith("stale (contract")


def test_certify_and_verify_commands(certs, capsys):
    out = certs / "published"
    assert main(["certify", "--backend", "reference", "--op", "per_block_cast_to_fp8", "--out", str(out)]) == 0
    path = out / "reference.json"
    assert path.exists() and (certificate.certificates_dir() / "reference.json").exists()
    assert main(["verify", str(path), "--sample", "2"]) == 0
    assert "verified: 2 re-run cases pass" in capsys.readouterr().out
    payload = json.loads(path.read_text())
    payload["tier"] = "full"
    path.write_text(json.dumps(payload))
    assert main(["verify", str(path)]) == 1
    assert "rejected" in capsys.readouterr().out


def test_hal_backends_reports_certification(certs):
    from hal.report import backends_report

    _certify("reference", ["per_token_cast_to_fp8"])
    report = backends_report()
    reference = next(b for b in report["backends"] if b["name"] == "reference")
    assert set(reference["certification"].values()) == {"trusted"}


def test_the_requirement_costs_nothing_measurable_per_call(certs, monkeypatch):
    """Selection is cached: with and without HAL_REQUIRE_CERTIFIED a call pays one cache lookup."""
    def per_call() -> float:
        hal.select("gemm_fp8_nt", "cpu")
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                hal.select("gemm_fp8_nt", "cpu")
            samples.append((time.perf_counter() - start) / 2000)
        return sorted(samples)[3]

    plain = per_call()
    monkeypatch.setenv(certificate.ENV_REQUIRE, "1")
    required = per_call()
    assert required < 2 * plain + 2e-6, (plain, required)
    registry.reload()
