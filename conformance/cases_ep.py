"""Conformance cases for the expert-parallel operators: the dispatch layout (DeepEP semantics)
and the local kernels of dispatch/combine (``ep_pack``, ``ep_unpack``, ``ep_combine_reduce``).

Routing draws distinct experts per token, with a fraction of slots set to -1, some tokens with no
expert at all, and (in some cases) experts of one rank never chosen, so ranks and experts that
receive zero tokens are covered. The local kernels get the same edge cases: rows sent nowhere,
buckets (ranks, experts) with no rows, tokens with no copy to reduce. Packed rows are either bf16
hidden states or the int64 words ``hal.ep`` frames messages in, so a backend that reorders,
drops or duplicates a row, or reads a word as something else, fails exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance.case import Case, Family, Measurement, Tensors, judge
from hal.ops.ep import dispatch_layout_reference
from hal.ops.ep_local import combine_reduce_reference, ep_combine_reduce, ep_pack, ep_unpack, pack_reference, unpack_reference

__all__ = ["ep_cases", "ep_local_cases"]

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
            measurements += judge(self.op, name, have, want)
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


def _rows(count: int, width: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random rows: bf16 hidden states, or int64 words (hal.ep's message framing)."""
    if kind == "words":
        return torch.randint(-(2**62), 2**62, (count, width), generator=generator, dtype=torch.int64)
    return torch.randn(count, width, generator=generator).to(torch.bfloat16)


class PackFamily(Family):
    op = "ep_pack"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        tokens, slots, buckets = params["tokens"], params["slots"], params["buckets"]
        scores = torch.rand(tokens, buckets, generator=generator)
        scores[:, buckets - 1] = -1.0  # the last bucket never receives a row
        bucket_idx = scores.topk(slots, dim=1).indices
        bucket_idx[torch.rand(tokens, slots, generator=generator) < params.get("drop", 0.3)] = -1
        bucket_idx[: max(1, tokens // 20)] = -1  # rows sent nowhere
        rows = _rows(tokens, params["width"], params["kind"], generator)
        return {"rows": rows, "bucket_idx": bucket_idx, "num_buckets": buckets}

    def run(self, inputs: Tensors) -> Tensors:
        return dict(zip(("packed", "src_idx", "num_rows_per_bucket"), ep_pack(inputs["rows"], inputs["bucket_idx"], inputs["num_buckets"])))

    def expect(self, inputs: Tensors) -> Tensors:
        return dict(zip(("packed", "src_idx", "num_rows_per_bucket"), pack_reference(inputs["rows"], inputs["bucket_idx"], inputs["num_buckets"])))


class UnpackFamily(Family):
    op = "ep_unpack"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        buckets, slots = params["buckets"], params["slots"]
        counts = torch.randint(0, slots + 1, (buckets,), generator=generator)
        counts[0], counts[-1] = 0, slots  # an empty bucket and a full one
        labels = torch.repeat_interleave(torch.arange(buckets), counts)
        bucket_of_row = labels[torch.randperm(labels.numel(), generator=generator)].to(torch.int32)
        rows = _rows(labels.numel(), params["width"], params["kind"], generator)
        return {"rows": rows, "bucket_of_row": bucket_of_row, "num_buckets": buckets, "num_slots": slots}

    def run(self, inputs: Tensors) -> Tensors:
        out = ep_unpack(inputs["rows"], inputs["bucket_of_row"], inputs["num_buckets"], inputs["num_slots"])
        return dict(zip(("slots", "num_rows_per_bucket"), out))

    def expect(self, inputs: Tensors) -> Tensors:
        out = unpack_reference(inputs["rows"], inputs["bucket_of_row"], inputs["num_buckets"], inputs["num_slots"])
        return dict(zip(("slots", "num_rows_per_bucket"), out))


class CombineReduceFamily(Family):
    op = "ep_combine_reduce"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        tokens, copies = params["tokens"], params["copies"]
        per_token = torch.randint(0, copies + 1, (tokens,), generator=generator)
        per_token[: max(1, tokens // 20)] = 0  # tokens with no copy come back as zeros
        src = torch.repeat_interleave(torch.arange(tokens), per_token)
        src_idx = src[torch.randperm(src.numel(), generator=generator)].to(torch.int32)
        rows = _rows(src.numel(), params["width"], "bf16", generator)
        weights = torch.rand(src.numel(), generator=generator) if params.get("weighted") else None
        return {"rows": rows, "src_idx": src_idx, "num_tokens": tokens, "weights": weights, "segments": params.get("segments", 1)}

    def run(self, inputs: Tensors) -> Tensors:
        rows = inputs["rows"]
        if inputs.get("segments", 1) > 1:  # contract v2: the same rows in pieces (an empty one first)
            cuts = [i * rows.shape[0] // (inputs["segments"] - 1) for i in range(inputs["segments"])]
            rows = (rows[:0],) + tuple(rows[a:b] for a, b in zip(cuts, cuts[1:]))
        return {"out": ep_combine_reduce(rows, inputs["src_idx"], inputs["num_tokens"], inputs["weights"])}

    def expect(self, inputs: Tensors) -> Tensors:
        return {"out": combine_reduce_reference(inputs["rows"], inputs["src_idx"], inputs["num_tokens"], inputs["weights"])}


def ep_local_cases() -> list[Case]:
    """Quick cases are tiny; full ones are DeepSeek-V3 sized (hidden 7168, 256 experts, top-8)."""
    pack, unpack, reduce = PackFamily(), UnpackFamily(), CombineReduceFamily()
    table = [
        # family, params, quick
        (pack, {"tokens": 40, "slots": 3, "buckets": 4, "width": 32, "kind": "bf16"}, True),
        (pack, {"tokens": 33, "slots": 8, "buckets": 64, "width": 10, "kind": "words"}, True),
        (pack, {"tokens": 4096, "slots": 6, "buckets": 8, "width": 7168, "kind": "bf16", "drop": 0.3}, False),
        (pack, {"tokens": 128, "slots": 8, "buckets": 256, "width": 912, "kind": "words", "drop": 0.0}, False),
        (pack, {"tokens": 4096, "slots": 16, "buckets": 32, "width": 904, "kind": "words", "drop": 0.6}, False),
        (unpack, {"buckets": 3, "slots": 12, "width": 24, "kind": "bf16"}, True),
        (unpack, {"buckets": 5, "slots": 7, "width": 6, "kind": "words"}, True),
        (unpack, {"buckets": 8, "slots": 2048, "width": 7168, "kind": "bf16"}, False),
        (unpack, {"buckets": 32, "slots": 256, "width": 904, "kind": "words"}, False),
        (reduce, {"tokens": 50, "copies": 3, "width": 64}, True),
        (reduce, {"tokens": 30, "copies": 8, "width": 128, "weighted": True}, True),
        (reduce, {"tokens": 4096, "copies": 8, "width": 7168}, False),
        (reduce, {"tokens": 128, "copies": 8, "width": 7168, "weighted": True}, False),
        (reduce, {"tokens": 256, "copies": 32, "width": 2048, "weighted": True}, False),
        # Rows in segments (contract version 2, feature row_segments): a combine's own rows and the received ones.
        (reduce, {"tokens": 40, "copies": 2, "width": 96, "segments": 3}, True),
        (reduce, {"tokens": 36, "copies": 5, "width": 64, "weighted": True, "segments": 4}, True),
        (reduce, {"tokens": 4096, "copies": 2, "width": 7168, "segments": 3}, False),
    ]

    def name(p: Mapping[str, Any]) -> str:
        parts = [f"{k[0]}{v}" for k, v in p.items() if k not in ("kind", "weighted", "drop")]
        return "-".join(parts) + (f"-{p['kind']}" if "kind" in p else "") + ("-weighted" if p.get("weighted") else "")

    return [Case(family, name(p), p, quick=quick, seed=70 + i) for i, (family, p, quick) in enumerate(table)]
