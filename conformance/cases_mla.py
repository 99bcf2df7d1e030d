"""Conformance cases for MLA decode (FlashMLA semantics).

Inputs follow FlashMLA's test: q and the cache drawn from N(0, 1); variable lengths drawn from a
normal around the mean (sd mean / 2, at least s_q); pages placed through a shuffled block table;
every cache slot a sequence does not own (tail of its last page, unused pages) is NaN, so a
kernel that reads past a sequence or through the wrong page produces NaN and fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance.case import Case, Family, Measurement, Tensors, judge
from hal.ops.mla import HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE
from hal.ops.mla_reference import mla_decode_reference
from hal.ops.mla_schedule import schedule_mla_splits

__all__ = ["MlaDecodeFamily", "mla_cases"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _seqlens(params: Mapping[str, Any], generator: torch.Generator) -> list[int]:
    if "seqlens" in params:
        return list(params["seqlens"])
    mean, batch, s_q = params["mean_sk"], params["batch"], params["s_q"]
    if not params.get("varlen", True):
        return [mean] * batch
    draws = torch.normal(float(mean), mean / 2, (batch,), generator=generator)
    return [max(int(d), s_q) for d in draws.tolist()]


class MlaDecodeFamily(Family):
    op = "mla_decode"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        dtype = DTYPES[params["dtype"]]
        s_q, h_q = params["s_q"], params["h_q"]
        seqlens = _seqlens(params, generator)
        batch = len(seqlens)
        pages = [math.ceil(s / PAGE_BLOCK_SIZE) for s in seqlens]
        max_pages = max(pages, default=0) + 1  # one spare column: entries past a sequence are never read
        num_blocks = sum(pages) + 3  # spare blocks that no sequence owns
        order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
        block_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
        k_cache = torch.full((num_blocks, PAGE_BLOCK_SIZE, 1, HEAD_DIM_QK), math.nan, dtype=dtype)
        used = 0
        for b, (seqlen, n) in enumerate(zip(seqlens, pages)):
            block_table[b, :n] = order[used : used + n]
            used += n
            keys = torch.randn(seqlen, 1, HEAD_DIM_QK, generator=generator).to(dtype)
            flat = torch.full((n * PAGE_BLOCK_SIZE, 1, HEAD_DIM_QK), math.nan, dtype=dtype)
            flat[:seqlen] = keys
            k_cache[block_table[b, :n].long()] = flat.view(n, PAGE_BLOCK_SIZE, 1, HEAD_DIM_QK)
        q = torch.randn(batch, s_q, h_q, HEAD_DIM_QK, generator=generator).to(dtype)
        return {
            "q": q,
            "k_cache": k_cache,
            "block_table": block_table,
            "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32),
            "causal": bool(params.get("causal", True)),
            "schedule_sms": params.get("schedule_sms"),
        }

    def run(self, inputs: Tensors) -> Tensors:
        q, seqlens = inputs["q"], inputs["cache_seqlens"]
        s_q, h_q = q.shape[1], q.shape[2]
        if inputs["schedule_sms"] is None:
            metadata, splits = hal.get_mla_metadata(seqlens, s_q * h_q, 1)
        else:  # the contract's own schedule with another SM count: every backend must accept it
            metadata, splits = schedule_mla_splits(seqlens, s_q * h_q, 1, num_sms=inputs["schedule_sms"])
        out, lse = hal.flash_mla_with_kvcache(
            q, inputs["k_cache"], inputs["block_table"], seqlens, HEAD_DIM_V, metadata, splits, causal=inputs["causal"]
        )
        return {"out": out, "lse": lse}

    def expect(self, inputs: Tensors) -> Tensors:
        q, seqlens = inputs["q"], inputs["cache_seqlens"]
        metadata, splits = schedule_mla_splits(seqlens, q.shape[1] * q.shape[2], 1)
        causal = inputs["causal"] and q.shape[1] > 1
        out, lse = mla_decode_reference(
            q, inputs["k_cache"], inputs["block_table"], seqlens, HEAD_DIM_V, metadata, splits, HEAD_DIM_QK**-0.5, causal
        )
        return {"out": out, "lse": lse}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        measurements = []
        if got["out"].dtype != inputs["q"].dtype:
            measurements.append(Measurement("out", "dtype", math.inf, 0, False, f"dtype {got['out'].dtype}, expected {inputs['q'].dtype}"))
        measurements += judge(self.op, "out", got["out"].float(), expected["out"].float())
        # Rows that see no key have lse = +inf by contract: judge compares non-finite positions exactly.
        measurements += judge(self.op, "lse", got["lse"], expected["lse"])
        return measurements


def _name(p: Mapping[str, Any]) -> str:
    lengths = "sk" + "_".join(map(str, p["seqlens"])) if "seqlens" in p else f"sk{p['mean_sk']}{'v' if p.get('varlen', True) else ''}"
    parts = [f"b{p.get('batch', len(p.get('seqlens', [])))}", f"sq{p['s_q']}", f"h{p['h_q']}", lengths, p["dtype"]]
    if not p.get("causal", True):
        parts.append("noncausal")
    if p.get("schedule_sms") is not None:
        parts.append(f"sched{p['schedule_sms']}")
    return "-".join(parts)


def mla_cases() -> list[Case]:
    family = MlaDecodeFamily()
    quick: list[dict[str, Any]] = [
        {"seqlens": [1, 63, 64, 65, 200], "s_q": 1, "h_q": 16, "dtype": "bf16"},
        {"seqlens": [2, 130, 77], "s_q": 2, "h_q": 16, "dtype": "bf16"},
        {"seqlens": [2, 130, 77], "s_q": 2, "h_q": 16, "dtype": "bf16", "causal": False},
        {"seqlens": [129, 5, 64], "s_q": 1, "h_q": 32, "dtype": "fp16"},
        {"seqlens": [300, 17], "s_q": 2, "h_q": 16, "dtype": "fp16", "schedule_sms": 7},
        {"seqlens": [0, 70], "s_q": 1, "h_q": 16, "dtype": "bf16", "causal": False},
        {"batch": 4, "mean_sk": 256, "s_q": 1, "h_q": 64, "dtype": "bf16"},
        # causal with sequences shorter than s_q (the padding slots of CUDA-graph batches): blind rows out 0, lse +inf
        {"seqlens": [1, 0, 70], "s_q": 2, "h_q": 16, "dtype": "bf16"},
    ]
    full: list[dict[str, Any]] = [
        {"batch": b, "mean_sk": sk, "s_q": s_q, "h_q": h, "dtype": "bf16"}
        for b in (1, 32, 128)
        for sk in (4096, 8192)
        for s_q in (1, 2)
        for h in (16, 32, 64, 128)
    ]
    full += [
        {"batch": 128, "mean_sk": 4096, "s_q": 1, "h_q": 16, "dtype": "bf16", "varlen": False},
        {"batch": 64, "mean_sk": 1024, "s_q": 2, "h_q": 128, "dtype": "fp16"},
        {"batch": 16, "mean_sk": 2048, "s_q": 1, "h_q": 128, "dtype": "bf16", "schedule_sms": 20},
    ]
    # Decode at the CPU goal shapes (every sequence exactly s_k long), which `hal bench --case`
    # times against the fastest torch formulation: b 16/32, s_k 1024/4096, h_q 16/128.
    full += [
        {"batch": b, "mean_sk": sk, "s_q": 1, "h_q": h, "dtype": "bf16", "varlen": False}
        for b in (16, 32) for sk in (1024, 4096) for h in (16, 128)
    ]
    cases = [Case(family, _name(p), p, quick=True, seed=i) for i, p in enumerate(quick)]
    cases += [Case(family, _name(p), p, quick=False, seed=100 + i) for i, p in enumerate(full)]
    return cases
