"""Host overhead per call: the fast environment reads and the overhead measurement."""

from __future__ import annotations

import math
import os

import pytest

from hal import env


def test_env_reads_follow_os_environ(monkeypatch: pytest.MonkeyPatch):
    name = "HAL_TEST_ENV_FAST_PATH"
    monkeypatch.delenv(name, raising=False)
    assert env.get(name) == "" and env.get(name, "d") == "d"
    os.environ[name] = "first"
    assert env.get(name) == "first"
    os.environ[name] = "sécond"  # non-ASCII values decode as os.environ does
    assert env.get(name) == os.environ[name]
    del os.environ[name]
    assert env.get(name, "gone") == "gone"


def test_check_values_switch_takes_effect_at_the_next_call(monkeypatch: pytest.MonkeyPatch):
    import torch

    from hal.checks import value_checks_enabled

    tensor = torch.zeros(1)
    monkeypatch.setenv("HAL_CHECK_VALUES", "0")
    assert not value_checks_enabled(tensor)
    monkeypatch.setenv("HAL_CHECK_VALUES", "1")
    assert value_checks_enabled(tensor)


def test_value_checks_are_opt_in_on_accelerators(monkeypatch: pytest.MonkeyPatch):
    # On an accelerator every value check is a host synchronisation: off unless asked for. (An
    # "xpu" device stands for one: a CUDA one would reach the graph-capture query, which needs CUDA.)
    import types

    import torch

    from hal.checks import value_checks_enabled

    accelerator = types.SimpleNamespace(device=torch.device("xpu"), is_cpu=False, is_meta=False, is_cuda=False)
    cpu = torch.zeros(1)
    for setting, on_cpu, on_accelerator in (("", True, False), ("0", False, False), ("off", False, False), ("1", True, True), ("on", True, True)):
        monkeypatch.setenv("HAL_CHECK_VALUES", setting)
        assert value_checks_enabled(cpu) is on_cpu, setting
        assert value_checks_enabled(accelerator) is on_accelerator, setting
        # a caller that synchronises anyway (EP dispatch) checks unless they are switched off
        assert value_checks_enabled(accelerator, synchronised=True) is on_cpu, setting
    assert not value_checks_enabled(torch.zeros(1, device="meta"))


def test_overhead_is_measured_against_the_backend_called_directly():
    from hal.bench.overhead import measure

    records = measure(["per_token_cast_to_fp8"], repeats=3, budget_s=0.005)
    assert [r["op"] for r in records] == ["per_token_cast_to_fp8"]
    record = records[0]
    assert "skipped" not in record, record
    assert record["direct_us"] > 0 and record["public_us"] > 0 and math.isfinite(record["overhead_us"])
    assert record["hal_calls"] == 1 and record["backends"]


def test_schedules_get_rows_of_their_own_and_operators_are_timed_without_them():
    from hal.bench.overhead import measure

    records = {r["op"]: r for r in measure(["mla_decode", "ep_pack"], repeats=3, budget_s=0.005)}
    assert set(records) == {"mla_decode", "ep_pack", "get_mla_metadata"}, records
    assert records["mla_decode"]["public"] == ["flash_mla_with_kvcache"]  # the schedule was made before, once
    assert records["get_mla_metadata"]["direct_us"] is None and records["get_mla_metadata"]["public_us"] > 0
    assert records["ep_pack"]["public"] == ["ep_pack"]  # a function the case imported by name is found too


def test_stepping_grows_per_step_ints_and_cases_can_be_chosen():
    """``stepping_us`` times the host path with each per-step int one larger every call (only for
    operators that take one); ``cases`` picks the timed case by id."""
    from hal.bench.overhead import _stepping, measure

    records = {r["op"]: r for r in measure(["paged_mqa_logits", "ep_pack"], repeats=3, budget_s=0.005)}
    assert math.isfinite(records["paged_mqa_logits"]["stepping_us"]) and records["ep_pack"]["stepping_us"] is None
    seen = []

    def paged(q, max_context_len, clean_logits=False):
        seen.append(max_context_len)

    calls = _stepping([("paged", paged, ("q", 40), {"clean_logits": True})])
    for _ in range(3):
        calls()
    assert seen == [41, 42, 43]
    assert _stepping([("logits", lambda q, max_seqlen_k=0: None, ("q",), {"max_seqlen_k": 0})]) is None  # 0 is a mode: not stepped

    from hal.conformance.catalogue import select_cases

    wanted = [c.id for c in select_cases(quick=True, ops=["mla_decode_v2"])][-1]
    (record,) = [r for r in measure(["mla_decode_v2"], repeats=3, budget_s=0.005, cases=[wanted]) if r["op"] == "mla_decode_v2"]
    assert record["case"] == wanted


def test_every_case_gets_a_row_and_conversions_are_marked():
    """``--every-case``: one row per quick case of the operator (schedules excluded), each timed
    with that case, those whose public path converts an input marked."""
    from hal.bench.overhead import measure_every_case
    from hal.conformance.catalogue import select_cases

    wanted = [c.id for c in select_cases(quick=True, ops=["m_grouped_gemm_fp8_nt_masked"]) if c.params.get("schedule_sms") is None]
    records = measure_every_case(["m_grouped_gemm_fp8_nt_masked"], repeats=1, budget_s=0.002)
    assert [r["case"] for r in records] == wanted and len(wanted) > 1
    assert all(math.isfinite(r["overhead_us"]) for r in records)
    assert {r["case"]: r["converting"] for r in records} == {case: "partialk" in case for case in wanted}
    assert any(r["converting"] for r in records) and not all(r["converting"] for r in records)
