"""The README's drop-in tables match the compat modules: every name marked present exists,
every name marked absent raises AttributeError with a reason."""

from __future__ import annotations

import re
from pathlib import Path

from hal.compat import deep_ep, deep_gemm, flash_mla

README = Path(__file__).resolve().parents[1] / "README.md"


def _rows(title: str) -> list[tuple[list[str], str]]:
    text = README.read_text()
    block = text[text.index(title):]
    block = block[: block.index("\n\n", block.index("|---|"))]
    rows = []
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| names"):
            names_cell, status = line.strip("|").split("|")[:2]
            names_cell = re.sub(r"\([^()]*\)", "", names_cell)  # argument lists and remarks, not names
            names = [n.split("(")[0].strip() for n in re.findall(r"`([^`]+)`", names_cell)]
            rows.append((names, status.strip()))
    return rows


def _expand(name: str) -> list[str]:
    """Spell out the table's shorthands: ``bf16_gemm_nt/nn`` -> bf16_gemm_nt, bf16_gemm_nn;
    ``set/get_num_sms`` -> set_num_sms, get_num_sms; ``get_m/k_alignment_x`` -> get_m_alignment_x,
    get_k_alignment_x. Fragments (``_nn_``) and wildcards (``fp8_fp4_gemm_*``) name nothing alone."""
    if name.startswith("_") or name.endswith("*") or " " in name:
        return []
    if "/" not in name:
        return [name]
    head, *tails = name.split("/")
    if "_" not in head:  # set/get_num_sms
        suffix = tails[-1][tails[-1].index("_"):]
        return [head + suffix] + tails
    if "_" in tails[0]:  # get_m/k_alignment_for_contiguous_layout
        prefix = head[: head.index("_") + 1]
        return [head + tails[0][tails[0].index("_"):], prefix + tails[0]]
    stem = head.rsplit("_", 1)[0]  # bf16_gemm_nt/nn/tn/tt
    return [head] + [f"{stem}_{t}" for t in tails]


def test_deep_gemm_table():
    for names, status in _rows("**DeepGEMM**"):
        for name in [n for raw in names for n in _expand(raw)]:
            if status.startswith("present"):
                if name.startswith(("legacy", "testing")) or not name.isidentifier():
                    continue
                assert hasattr(deep_gemm, name), name
            elif status.startswith("absent"):
                assert not hasattr(deep_gemm, name), name
                try:
                    getattr(deep_gemm, name)
                except AttributeError as exc:
                    assert name in str(exc)


def test_deep_ep_table():
    buffer_methods = {"get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine", "capture", "set_num_sms",
                      "get_dispatch_config", "get_combine_config", "get_low_latency_rdma_size_hint", "destroy", "clean_low_latency_buffer",
                      "get_next_low_latency_combine_buffer", "get_local_buffer_tensor", "get_comm_stream", "is_sm90_compiled"}
    assert all(hasattr(deep_ep.Buffer, m) for m in buffer_methods)
    assert all(hasattr(deep_ep.Config, m) for m in ("get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint"))
    assert not hasattr(deep_ep.Buffer, "low_latency_update_mask_buffer") and not hasattr(deep_ep, "ElasticBuffer")


def test_flash_mla_surface():
    assert {"get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd", "FlashMLASchedMeta"} <= set(flash_mla.__all__)
    assert flash_mla.__version__ == "1.0.0"
    for name in ("flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"):
        assert not hasattr(flash_mla, name)
        try:
            getattr(flash_mla, name)
        except AttributeError as exc:
            assert name in str(exc) and "SM100" in str(exc)
