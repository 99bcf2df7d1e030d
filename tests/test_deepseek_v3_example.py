"""The DeepSeek-V3 example: transformers' own DeepseekV3 model (random weights, real MLA dims, an FP8
safetensors checkpoint) decoding through hal, consistent with transformers' eager forward at every
step, with the same tokens on every backend and with its experts sharded over 2 gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hal

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytest.importorskip("transformers")
sys.path.insert(0, str(EXAMPLES))
import deepseek_v3  # noqa: E402

TINY = {"seed": 0, "layers": 2, "batch": 2, "prompt": 8, "tokens": 4, "verbose": False}


@pytest.fixture(scope="module")
def on_reference():
    with hal.use_backend("reference"):
        return deepseek_v3.run(**TINY)


def test_decode_is_consistent_with_transformers(on_reference):
    assert on_reference["consistent"], on_reference["steps"]
    assert max(f["diff"] for f in on_reference["steps"]) < 1e-4  # FP8 activations: about 2e-5
    assert sum(f["argmax_equal"] for f in on_reference["steps"]) >= 3  # ties are the exception
    assert {"gemm_fp8_nt", "mla_decode", "m_grouped_gemm_fp8_nt_contiguous", "per_token_cast_to_fp8"} <= set(on_reference["operator_seconds"])


def test_the_checkpoint_is_deepseek_v3_fp8_format(tmp_path):
    from safetensors.torch import load_file

    model, _ = deepseek_v3.build(0, 2)
    deepseek_v3.save_fp8_checkpoint(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    weight = tensors["model.layers.0.self_attn.o_proj.weight"]
    scales = tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    assert weight.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert scales.shape == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.skipif(not (hal.get_backend("opencl") and hal.get_backend("opencl").available), reason="no OpenCL runtime")
def test_opencl_gives_the_reference_tokens(on_reference):
    with hal.use_backend("opencl"):
        result = deepseek_v3.run(**TINY)
    assert result["consistent"] and torch.equal(result["tokens"], on_reference["tokens"])


def _example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(EXAMPLES / "deepseek_v3.py"), *args], capture_output=True, text=True, env=environment, timeout=900)


def test_the_simulated_triton_backend_gives_the_reference_tokens():
    result = _example("--tokens", "2", "--batch", "1", env={"TRITON_INTERPRET": "1", "HAL_BACKEND": "cuda,reference"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with hal.use_backend("reference"):
        reference = deepseek_v3.run(**{**TINY, "tokens": 2, "batch": 1})
    assert f"step  1: tokens {reference['tokens'][:, 1].tolist()}" in result.stdout


def test_experts_sharded_over_two_ranks_give_the_same_tokens():
    result = _example("--ep", "2", "--tokens", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tokens equal the single-process run" in result.stdout
