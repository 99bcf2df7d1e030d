"""Peers: other implementations of an operator that a user could run instead of unihal.

Each peer is a name and its formulations (:mod:`hal.bench.formulation`): ``torch`` offers several
per operator (:mod:`hal.bench.peers_mla`, :mod:`hal.bench.peers_gemm`) and the bench times the
fastest one that is correct on the case; the anchors ``flash_mla`` and ``deep_gemm`` have one
each and join when importable on a CUDA device. Peers are found, never installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from hal.bench.formulation import Formulation, Prepared
from hal.bench.memory import nbytes
from hal.bench.peers_gemm import GEMM_FORMULATIONS
from hal.bench.peers_mla import MLA_FORMULATIONS
from hal.bench.peers_mla_v2 import MLA_V2_FORMULATIONS
from hal.conformance.case import Tensors
from hal.ops.mla import HEAD_DIM_V

__all__ = ["PeerSpec", "peer_specs"]


@dataclass(frozen=True)
class PeerSpec:
    """A peer of one operator: ``name`` (``torch``, ``flash_mla``, ...), its formulations, and
    ``applies(device)``: whether it can run on that device type here."""

    name: str
    formulations: tuple[Formulation, ...]
    applies: Callable[[str], bool]


def _flash_mla(inputs: Tensors) -> Prepared:
    import flash_mla  # noqa: PLC0415  (optional peer)

    q, seqlens = inputs["q"], inputs["cache_seqlens"]
    metadata, splits = flash_mla.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)

    def call():
        return flash_mla.flash_mla_with_kvcache(q, inputs["k_cache"], inputs["block_table"], seqlens, HEAD_DIM_V, metadata, splits, causal=inputs["causal"])

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


def _deep_gemm(inputs: Tensors) -> Prepared:
    import deep_gemm  # noqa: PLC0415  (optional peer)

    a, sa, b, sb, out = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], inputs["out"]
    sa_aligned = deep_gemm.get_col_major_tma_aligned_tensor(sa)

    def call():
        deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa_aligned), (b, sb), out)

    def outputs() -> Tensors:
        call()
        return {"out": out}

    return Prepared(call, outputs)


def _importable_on_cuda(module: str) -> Callable[[str], bool]:
    return lambda device: device == "cuda" and importlib.util.find_spec(module) is not None


def _outputs_only(inputs: Tensors) -> int:
    """Scratch of a fused kernel: about its outputs (taken as the in-place outputs, or 1/8 of the inputs)."""
    own = nbytes({k: v for k, v in inputs.items() if k in ("out", "d")})
    return own or nbytes(inputs) // 8


def _torch(op: str) -> PeerSpec:
    formulations = MLA_FORMULATIONS if op == "mla_decode" else MLA_V2_FORMULATIONS if op == "mla_decode_v2" else GEMM_FORMULATIONS[op]
    return PeerSpec("torch", formulations, lambda device: True)


_PEERS: dict[str, list[PeerSpec]] = {
    "mla_decode": [_torch("mla_decode"), PeerSpec("flash_mla", (Formulation("flash_mla_with_kvcache", _flash_mla, _outputs_only),), _importable_on_cuda("flash_mla"))],
    "mla_decode_v2": [_torch("mla_decode_v2")],
    "gemm_fp8_nt": [_torch("gemm_fp8_nt"), PeerSpec("deep_gemm", (Formulation("gemm_fp8_fp8_bf16_nt", _deep_gemm, _outputs_only),), _importable_on_cuda("deep_gemm"))],
    **{op: [_torch(op)] for op in GEMM_FORMULATIONS if op != "gemm_fp8_nt"},
}


def peer_specs(op: str, device: str) -> list[PeerSpec]:
    """The peers of ``op`` that can run on ``device`` here (none for operators without peers)."""
    return [spec for spec in _PEERS.get(op, []) if spec.applies(device)]
