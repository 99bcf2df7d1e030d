"""Versioned contracts: operators declare optional features, backends declare what they serve, and
selection only hands a call to a backend that declares every feature it uses."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import hal
from hal import registry
from hal.operator import Feature, Operator
from hal.plugin import BackendInfo


@pytest.fixture
def narrow(install_plugins):
    install_plugins({"narrow": "partial_features", "versioned": "versioned"})
    import partial_features

    partial_features.CALLS.clear()
    return partial_features.CALLS


def _logits_inputs():
    q = torch.randn(4, 4, 32).to(torch.float8_e4m3fn)
    k, sf = hal.quantize_indexer_keys(torch.randn(8, 32))
    return q, (k, sf), torch.randn(4, 4), torch.zeros(4, dtype=torch.int32), torch.full((4,), 8, dtype=torch.int32)


def test_auto_selection_skips_a_backend_lacking_a_feature_and_says_so(narrow, caplog):
    hal.fp8_mqa_logits(*_logits_inputs())
    assert narrow == ["mqa_logits"]  # float32 logits: its declared (empty) feature set suffices
    with caplog.at_level(logging.WARNING, logger="hal"):
        out = hal.fp8_fp4_mqa_logits(*_logits_inputs(), logits_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and narrow == ["mqa_logits"]  # served by another backend
    assert "lacks feature bf16_logits" in caplog.text and "narrow" in caplog.text


def test_a_named_backend_lacking_a_feature_raises_a_typed_error(narrow, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "narrow")
    with pytest.raises(hal.FeatureNotSupportedError) as info:
        hal.fp8_fp4_mqa_logits(*_logits_inputs(), logits_dtype=torch.bfloat16)
    error = info.value
    assert isinstance(error, hal.OperatorNotSupportedError)
    assert error.missing == ("bf16_logits",) and "reference" in error.capable
    assert "bf16_logits (logits rounded to bf16" in str(error) and "HAL_BACKEND_MQA_LOGITS" in str(error)
    monkeypatch.setenv("HAL_BACKEND", "narrow,reference")  # an explicit chain falls back
    assert hal.fp8_fp4_mqa_logits(*_logits_inputs(), logits_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_features_of_the_v32_decode_route_calls(narrow):
    sparse = hal.select("mla_decode_v2", "cpu", features={"sparse", "fp8_kv"})
    assert sparse.backend.name == "narrow"
    assert hal.select("mla_decode_v2", "cpu", features={"sparse", "sink"}).backend.name != "narrow"
    assert hal.select("mla_decode_v2", "cpu", features={"dense", "fp8_kv"}).backend.name != "narrow"
    # Names a plugin declares that unihal does not know (a newer contract) are ignored, not fatal.
    assert "a_feature_from_the_future" not in hal.get_backend("narrow").features(hal.OPERATORS["mla_decode_v2"])


def test_contract_versions_grant_the_features_up_to_that_version():
    op = Operator("toy", "hal_toy", "test", "a toy", version=2, features=(Feature("a", "old", 1), Feature("b", "new", 2)))
    old = registry.Backend("old", "test", info=BackendInfo("old"))
    new = registry.Backend("new", "test", info=BackendInfo("new", contract_versions={"toy": 2}))
    narrow = registry.Backend("narrow", "test", info=BackendInfo("narrow", features={"toy": ("b",)}))
    assert old.features(op) == {"a"}  # written before b existed: never handed a call that uses b
    assert new.features(op) == {"a", "b"}
    assert narrow.features(op) == {"b"}


def test_declaring_a_feature_introduced_later_than_the_contract_is_a_bug():
    from hal.operator import declare

    with pytest.raises(ValueError, match="since"):
        declare("toy_bad", "hal_toy_bad", "test", "bad", version=1, features=(Feature("x", "x", 2),))


def test_ill_typed_feature_declarations_mark_the_plugin_broken():
    assert registry._info_problem(BackendInfo("x", features={"mqa_logits": "bf16_logits"})) is not None
    assert registry._info_problem(BackendInfo("x", contract_versions={"mqa_logits": 0})) is not None
    assert registry._info_problem(BackendInfo("x", features={"mqa_logits": ("bf16_logits",)})) is None


def test_hal_backends_lists_features_per_backend(narrow):
    from hal.report import backends_report

    report = backends_report()
    by_name = {b["name"]: b for b in report["backends"]}
    assert by_name["narrow"]["features"]["mqa_logits"] == []
    assert by_name["narrow"]["features"]["mla_decode_v2"] == ["fp8_kv", "sparse", "topk_length"]
    assert by_name["reference"]["features"]["mqa_logits"] == ["bf16_logits", "bf16_weights", "compressed"]
    assert by_name["versioned"]["features"]["paged_mqa_logits"] == ["bf16_logits", "bf16_weights", "context_lens_1d"]
    assert report["operators"]["mla_decode_v2"]["features"]["fp8_kv"].startswith("the 656-byte")


def test_every_in_tree_backend_serves_every_feature_of_what_it_implements():
    for name in ("reference",):
        backend = hal.get_backend(name)
        for op in hal.OPERATORS.values():
            if backend.implements(op.hook):
                assert backend.features(op) == {f.name for f in op.features}, (name, op.name)


def test_cli_shows_features():
    result = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--features"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "mla_decode_v2" in result.stdout and "fp8_kv" in result.stdout and "bf16_logits" in result.stdout
    report = json.loads(subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, check=True).stdout)
    assert "features" in report["backends"][0]
