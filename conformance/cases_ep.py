"""Conformance cases for the expert-parallel dispatch layout (DeepEP semantics).

Routing draws distinct experts per token, with a fraction of slots set to -1, some tokens with no
expert at all, and (in some cases) experts of one rank never chosen, so ranks and experts that
receive zero tokens are covered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance.case import Case, Family, Measurement, Tensors, judge
from hal.ops.ep import dispatch_layout_reference

__all__ = ["ep_cases"]

OUTPUTS = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")


class DispatchLayoutFamily(Family):
    op = "ep_dispatch_layout"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        tokens, topk, experts, ranks = params["tokens"], params["topk"], params["experts"], params["ranks"]
        scores = torch.rand(tokens, experts, generator=generator)
        if params.get("idle_rank"):
            scores[:, : experts // ranks] = -1.0  # rank 0's experts are never chosen
        topk_idx = scores.topk(topk, dim=1).indices
        dropped = torch.rand(tokens, topk, generator=generator) < params.get("drop", 0.1)
        topk_idx[dropped] = -1
        topk_idx[: max(1, tokens // 50)] = -1  # tokens routed nowhere
        return {"topk_idx": topk_idx, "num_experts": experts, "num_ranks": ranks}

    def run(self, inputs: Tensors) -> Tensors:
        return dict(zip(OUTPUTS, hal.get_dispatch_layout(inputs["topk_idx"], inputs["num_experts"], inputs["num_ranks"])))

    def expect(self, inputs: Tensors) -> Tensors:
        return dict(zip(OUTPUTS, dispatch_layout_reference(inputs["topk_idx"], inputs["num_experts"], inputs["num_ranks"])))

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        measurements = []
        for name in OUTPUTS:
            want, have = expected[name], got[name]
            if want is None or have is None:
                ok = want is None and have is None
                note = "" if ok else f"expected {'None' if want is None else 'a tensor'}, got {'None' if have is None else 'a tensor'}"
                measurements.append(Measurement(name, "mismatches", 0.0 if ok else float("inf"), 0, ok, note))
                continue
            if have.dtype != want.dtype:
                measurements.append(Measurement(name, "dtype", float("inf"), 0, False, f"dtype {have.dtype}, expected {want.dtype}"))
                continue
            measurements.append(judge(self.op, name, have, want))
        return measurements


def ep_cases() -> list[Case]:
    family = DispatchLayoutFamily()
    quick = [
        {"tokens": 64, "topk": 4, "experts": 16, "ranks": 4},
        {"tokens": 100, "topk": 8, "experts": 64, "ranks": 8, "idle_rank": True},
        {"tokens": 96, "topk": 8, "experts": 64, "ranks": 16},
        {"tokens": 33, "topk": 2, "experts": 8, "ranks": 1, "drop": 0.5},
    ]
    full = [
        {"tokens": 4096, "topk": 8, "experts": 256, "ranks": r} for r in (8, 16, 32, 64)
    ] + [{"tokens": 128, "topk": 8, "experts": 288, "ranks": 144}]

    def name(p: Mapping[str, Any]) -> str:
        return f"t{p['tokens']}-k{p['topk']}-e{p['experts']}-r{p['ranks']}" + ("-idle" if p.get("idle_rank") else "")

    return [Case(family, name(p), p, quick=True, seed=50 + i) for i, p in enumerate(quick)] + [
        Case(family, name(p), p, quick=False, seed=60 + i) for i, p in enumerate(full)
    ]
