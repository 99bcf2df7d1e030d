"""Peers: other implementations of an operator that a user could run instead of unihal.

Each peer is prepared from a case's inputs (already on the device) and returns a callable plus a
function producing its outputs for a correctness check: a peer whose result is out of tolerance
is reported as wrong and excluded from the ratios. Peers are found, never installed: torch's own
operators always; ``flash_mla`` and ``deep_gemm`` when importable on a CUDA device.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hal.conformance.case import Tensors
from hal.ops.fp8_quant import dequantize_per_block, dequantize_per_token
from hal.ops.mla import HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE

__all__ = ["Peer", "peers_for"]


@dataclass(frozen=True)
class Peer:
    """A named alternative implementation: ``call()`` runs it; ``outputs()`` runs it and returns the
    outputs under the names the conformance family compares."""

    name: str
    call: Callable[[], Any]
    outputs: Callable[[], Tensors]


def _mla_torch_sdpa(inputs: Tensors) -> Peer:
    """Gather each sequence's pages into a padded dense cache, then SDPA with a length/causal mask."""
    q, k_cache, table, seqlens = inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"]
    batch, s_q, h_q, _ = q.shape
    pages = math.ceil(int(seqlens.max()) / PAGE_BLOCK_SIZE) if batch else 0
    keys_at = torch.arange(pages * PAGE_BLOCK_SIZE, device=q.device)
    visible = seqlens.long()[:, None, None] - s_q + 1 + torch.arange(s_q, device=q.device)[None, :, None] if inputs["causal"] and s_q > 1 else seqlens.long()[:, None, None]
    mask = (keys_at[None, None, :] < visible)[:, None]  # [b, 1, s_q, S]
    query = q.transpose(1, 2)  # [b, h_q, s_q, d]

    def call() -> torch.Tensor:
        dense = k_cache[table[:, :pages].clamp(min=0).long()].reshape(batch, 1, pages * PAGE_BLOCK_SIZE, HEAD_DIM_QK)
        return torch.nn.functional.scaled_dot_product_attention(
            query, dense, dense[..., :HEAD_DIM_V], attn_mask=mask, scale=HEAD_DIM_QK**-0.5, enable_gqa=True
        )

    def outputs() -> Tensors:
        return {"out": call().transpose(1, 2)}

    return Peer("torch.sdpa (gathered pages)", call, outputs)


def _mla_flash_mla(inputs: Tensors) -> Peer:
    import flash_mla  # noqa: PLC0415  (optional peer)

    q, seqlens = inputs["q"], inputs["cache_seqlens"]
    metadata, splits = flash_mla.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)

    def call():
        return flash_mla.flash_mla_with_kvcache(q, inputs["k_cache"], inputs["block_table"], seqlens, HEAD_DIM_V, metadata, splits, causal=inputs["causal"])

    def outputs() -> Tensors:
        out, lse = call()
        return {"out": out, "lse": lse}

    return Peer("flash_mla", call, outputs)


def _gemm_torch_dequant(inputs: Tensors) -> Peer:
    """Dequantise both operands to bf16 and multiply: what a model without an FP8 GEMM does.
    Cases of DeepGEMM's current API (``d``, ``c``, per-token RHS, UE8M0 scales) are served too."""
    from hal.conformance.cases_gemm import _scales_f32

    a, b = inputs["a"], inputs["b"]
    k = a.shape[1]
    sa, sb = _scales_f32(inputs["sa"], k), _scales_f32(inputs["sb"], k)
    dtype = torch.bfloat16 if a.device.type != "cpu" else torch.float32
    rhs = dequantize_per_token if sb.shape[0] == b.shape[0] and b.shape[0] > 1 else dequantize_per_block
    target = inputs["out"] if "out" in inputs else inputs["d"]
    c = inputs.get("c")

    def pad(x: torch.Tensor) -> torch.Tensor:  # dequantise over whole 128-channel blocks
        return torch.nn.functional.pad(x.float(), (0, -k % 128)).to(torch.float8_e4m3fn)

    def call() -> torch.Tensor:
        product = (rhs_a(a) @ rhs(pad(b), sb)[:, :k].to(dtype).T).float()
        return (product + c.float() if c is not None else product).to(target.dtype)

    def rhs_a(x: torch.Tensor) -> torch.Tensor:
        return dequantize_per_token(pad(x), sa)[:, :k].to(dtype)

    return Peer("torch (dequantize + matmul)", call, lambda: {"out" if "out" in inputs else "d": call()})


def _bf16_torch(inputs: Tensors) -> Peer:
    """torch.matmul on the bf16 operands (float32 on the CPU, whose bf16 matmul is slow), c added."""
    a, b, d, c = inputs["a"], inputs["b"], inputs["d"], inputs.get("c")
    dtype = torch.bfloat16 if a.device.type != "cpu" else torch.float32

    def call() -> torch.Tensor:
        if a.dim() == 3:  # masked: one batched matmul over the experts' slots
            return torch.bmm(a.to(dtype), b.to(dtype).transpose(1, 2)).to(d.dtype)
        if "m_indices" in inputs:
            result = d.clone()
            for g in range(b.shape[0]):
                rows = inputs["m_indices"] == g
                result[rows] = (a[rows].to(dtype) @ b[g].to(dtype).T).to(d.dtype)
            return result
        product = (a.to(dtype) @ b.to(dtype).T).float()
        return (product + c.float() if c is not None else product).to(d.dtype)

    def outputs() -> Tensors:
        result = call()
        if a.dim() == 3:  # rows past masked_m are not compared
            keep = torch.arange(result.shape[1], device=result.device)[None, :, None] < inputs["masked_m"].long()[:, None, None]
            result = torch.where(keep, result, d)
        return {"d": result}

    return Peer("torch.matmul", call, outputs)


def _gemm_torch_scaled_mm(inputs: Tensors) -> Peer:
    """torch._scaled_mm with DeepGEMM's block scaling (1x128 LHS, 128x128 RHS), where torch supports it."""
    a, sa, b, sb = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"]
    scale_a = sa.contiguous()
    scale_b = sb.t().contiguous()  # [K/128, ceil(N/128)]

    def call() -> torch.Tensor:
        return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    return Peer("torch._scaled_mm (blockwise)", call, lambda: {"out": call()})


def _gemm_deep_gemm(inputs: Tensors) -> Peer:
    import deep_gemm  # noqa: PLC0415  (optional peer)

    a, sa, b, sb, out = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], inputs["out"]
    sa_aligned = deep_gemm.get_col_major_tma_aligned_tensor(sa)

    def call():
        deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa_aligned), (b, sb), out)

    def outputs() -> Tensors:
        call()
        return {"out": out}

    return Peer("deep_gemm", call, outputs)


def _grouped_torch_loop(inputs: Tensors) -> Peer:
    """One dequantised matmul per expert."""
    a, sa, b, sb, out = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], inputs["out"]
    dtype = torch.bfloat16 if a.device.type != "cpu" else torch.float32
    weights = [dequantize_per_block(b[g], sb[g]).to(dtype) for g in range(b.shape[0])]
    if "m_indices" in inputs:
        groups = inputs["m_indices"].long()
        segments = [(g, (groups == g).nonzero().squeeze(1)) for g in range(b.shape[0])]
    else:
        masked = inputs["masked_m"].tolist()

    def call() -> torch.Tensor:
        result = out.clone()
        if "m_indices" in inputs:
            for g, rows in segments:
                result[rows] = (dequantize_per_token(a[rows], sa[rows]).to(dtype) @ weights[g].T).to(torch.bfloat16)
        else:
            for g, rows in enumerate(masked):
                result[g, :rows] = (dequantize_per_token(a[g, :rows], sa[g, :rows]).to(dtype) @ weights[g].T).to(torch.bfloat16)
        return result

    return Peer("torch (per-expert dequantize + matmul)", call, lambda: {"out": call()})


_BUILDERS: dict[str, list[tuple[Callable[[Tensors], Peer], Callable[[str], bool]]]] = {
    "mla_decode": [
        (_mla_torch_sdpa, lambda device: True),
        (_mla_flash_mla, lambda device: device == "cuda" and importlib.util.find_spec("flash_mla") is not None),
    ],
    "gemm_fp8_nt": [
        (_gemm_torch_dequant, lambda device: True),
        (_gemm_torch_scaled_mm, lambda device: device == "cuda"),
        (_gemm_deep_gemm, lambda device: device == "cuda" and importlib.util.find_spec("deep_gemm") is not None),
    ],
    "m_grouped_gemm_fp8_nt_contiguous": [(_grouped_torch_loop, lambda device: True)],
    "gemm_bf16_nt": [(_bf16_torch, lambda device: True)],
    "m_grouped_gemm_bf16_nt_contiguous": [(_bf16_torch, lambda device: True)],
    "m_grouped_gemm_bf16_nt_masked": [(_bf16_torch, lambda device: True)],
    "m_grouped_gemm_fp8_nt_masked": [(_grouped_torch_loop, lambda device: True)],
}


def peers_for(op: str, inputs: Tensors, device: str) -> tuple[list[Peer], list[str]]:
    """Peers that can run here, and ``"name: why not"`` for those that could not be prepared."""
    peers, problems = [], []
    for build, applies in _BUILDERS.get(op, []):
        if not applies(device):
            continue
        try:
            peers.append(build(inputs))
        except Exception as exc:
            problems.append(f"{build.__name__}: {type(exc).__name__}: {exc}")
    return peers, problems


