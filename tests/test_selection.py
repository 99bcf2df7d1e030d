"""Selection: HAL_BACKEND, per-operator variables, fallback chains, use_backend, auto, errors."""

from __future__ import annotations

import logging

import pytest
import torch

import hal


def gemm_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    a = hal.per_token_cast_to_fp8(torch.randn(4, 128, generator=g))
    b = hal.per_block_cast_to_fp8(torch.randn(128, 128, generator=g))
    out = torch.empty(4, 128, dtype=torch.bfloat16)
    return a, b, out


@pytest.fixture
def with_test_backends(install_plugins, recording):
    install_plugins(
        {"recording": "recording_backend", "broken": "broken_import", "flaky": "raising_probe", "xpu": "accelerator_only"}
    )
    return recording


def test_auto_prefers_the_highest_priority_capable_backend(with_test_backends):
    chosen = hal.select("gemm_fp8_nt", "cpu")
    assert chosen.backend.name == "recording"  # xpu (500) takes no cpu tensors, flaky (300) is unavailable
    assert chosen.source == "auto"
    hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
    assert with_test_backends == ["gemm_fp8_nt"]


def test_auto_passes_over_a_preferred_backend_that_lacks_the_operator(with_test_backends):
    op = hal.OPERATORS["ep_dispatch_layout"]
    capable = [b for b in hal.list_backends().values() if b.available and b.implements(op.hook) and b.accepts_device("cpu")]
    expected = max(capable, key=lambda b: (b.priority, [-ord(c) for c in b.name]))
    chosen = hal.select(op, "cpu")
    assert chosen.backend.name == expected.name != "recording"
    assert "recording" in chosen.reason


def test_hal_backend_env_selects_every_operator(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "reference")
    hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
    assert with_test_backends == []
    assert hal.select("gemm_fp8_nt").source == "HAL_BACKEND=reference"


def test_per_operator_env_overrides_global(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "reference")
    monkeypatch.setenv("HAL_BACKEND_GEMM_FP8_NT", "recording")
    hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
    assert with_test_backends == ["gemm_fp8_nt"]
    assert hal.select("mla_decode").backend.name == "reference"


def test_single_unavailable_backend_raises_with_reason_and_alternatives(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "cuda")
    with pytest.raises(hal.BackendUnavailableError, match=r"backend 'cuda' \(selected by HAL_BACKEND=cuda\) is unavailable") as err:
        hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
    assert "no CUDA device" in str(err.value)
    assert "Available backends:" in str(err.value) and "reference" in str(err.value)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, hal.HalError)


def test_no_silent_fallback_when_named_backend_lacks_operator(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "recording")
    topk = torch.tensor([[0, 1]])
    with pytest.raises(hal.OperatorNotSupportedError, match="does not implement this operator") as err:
        hal.get_dispatch_layout(topk, 4, 2)
    assert "HAL_BACKEND_EP_DISPATCH_LAYOUT" in str(err.value)
    assert isinstance(err.value, NotImplementedError)


def test_unknown_backend_lists_known_ones(monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "cdua")
    with pytest.raises(hal.UnknownBackendError, match="unknown backend 'cdua'") as err:
        hal.select("gemm_fp8_nt")
    assert "reference" in str(err.value) and "cuda" in str(err.value)
    assert isinstance(err.value, LookupError)


def test_unknown_backend_in_chain_is_an_error_even_if_others_work(monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "reference,nonesuch")
    with pytest.raises(hal.UnknownBackendError, match="nonesuch"):
        hal.select("gemm_fp8_nt")


def test_fallback_chain_skips_and_logs_once(with_test_backends, monkeypatch, caplog):
    monkeypatch.setenv("HAL_BACKEND", "cuda,flaky,reference")
    with caplog.at_level(logging.WARNING, logger="hal"):
        for _ in range(3):
            hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
    records = [r for r in caplog.records if "gemm_fp8_nt" in r.getMessage()]
    assert len(records) == 1, "each fallback is logged once"
    message = records[0].getMessage()
    assert "runs on 'reference'" in message and "cuda: unavailable" in message and "flaky: unavailable" in message
    assert with_test_backends == []


def test_chain_with_auto(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "cuda,auto")
    assert hal.select("gemm_fp8_nt").backend.name == "recording"


def test_chain_all_failing_lists_every_reason(monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "cuda,rocm")
    with pytest.raises(hal.BackendUnavailableError, match="no backend in HAL_BACKEND=cuda,rocm") as err:
        hal.select("mla_decode")
    assert "cuda: unavailable" in str(err.value) and "rocm: unavailable" in str(err.value)


def test_device_mismatch_names_argument_and_alternatives(with_test_backends, monkeypatch):
    inputs = gemm_inputs()
    monkeypatch.setenv("HAL_BACKEND", "xpu")
    with pytest.raises(hal.DeviceError, match=r"argument 'lhs\[0\]' expected a tensor on xpu") as err:
        hal.gemm_fp8_fp8_bf16_nt(*inputs)
    assert "recording" in str(err.value) and "reference" in str(err.value)


def test_use_backend_scopes_nest_and_beat_env(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND_GEMM_FP8_NT", "recording")
    with hal.use_backend("reference"):
        hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
        assert with_test_backends == []
        with hal.use_backend("recording", op="gemm_fp8_nt"):
            hal.gemm_fp8_fp8_bf16_nt(*gemm_inputs())
            assert hal.select("mla_decode").backend.name == "reference", "an op-scoped scope leaves other ops alone"
        assert with_test_backends == ["gemm_fp8_nt"]
        assert hal.select("gemm_fp8_nt").source == "use_backend('reference')"
    assert hal.select("gemm_fp8_nt").backend.name == "recording"


def test_use_backend_rejects_unknown_names_and_operators():
    with pytest.raises(hal.UnknownBackendError):
        with hal.use_backend("nonesuch"):
            pass
    with pytest.raises(LookupError, match="unknown operator 'mla'"):
        with hal.use_backend("reference", op="mla"):
            pass


def test_env_changes_take_effect_without_restart(with_test_backends, monkeypatch):
    # Selection reuses its last answer per call site only while every input to it is unchanged.
    assert hal.select("gemm_fp8_nt").backend.name == "recording"
    monkeypatch.setenv("HAL_BACKEND", "reference")
    assert hal.select("gemm_fp8_nt").backend.name == "reference"
    monkeypatch.setenv("HAL_BACKEND_GEMM_FP8_NT", "recording")
    assert hal.select("gemm_fp8_nt").backend.name == "recording"
    with hal.use_backend("reference", op="gemm_fp8_nt"):
        assert hal.select("gemm_fp8_nt").backend.name == "reference"
    assert hal.select("gemm_fp8_nt").backend.name == "recording"
    monkeypatch.delenv("HAL_BACKEND_GEMM_FP8_NT")
    monkeypatch.delenv("HAL_BACKEND")
    assert hal.select("gemm_fp8_nt").backend.name == "recording"


def test_get_mla_metadata_follows_the_mla_decode_selection(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND_MLA_DECODE", "cuda")
    with pytest.raises(hal.BackendUnavailableError):
        hal.get_mla_metadata(torch.tensor([64], dtype=torch.int32), 16, 1)
    monkeypatch.setenv("HAL_BACKEND_MLA_DECODE", "recording")
    metadata, splits = hal.get_mla_metadata(torch.tensor([64], dtype=torch.int32), 16, 1)
    assert metadata.shape[1] == 8 and splits.tolist()[0] == 0


def test_broken_plugin_named_explicitly_explains_itself(with_test_backends, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "broken")
    with pytest.raises(hal.BackendUnavailableError, match="plugin failed to load: ImportError"):
        hal.select("gemm_fp8_nt")


def test_threads_start_outside_a_scope_unless_their_callable_carries_it():
    from concurrent.futures import ThreadPoolExecutor

    def chosen() -> str:
        return hal.select("gemm_fp8_nt", "cpu").source

    with hal.use_backend("reference"):
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(chosen).result()
            carried = pool.submit(hal.carry_backend(chosen)).result()
    assert plain == "auto"
    assert carried == "use_backend('reference')"
