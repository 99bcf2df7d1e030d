"""Conformance cases for DeepSeek-V3.2's indexer logits (DeepGEMM's ``tests/test_attention.py`` grids).

Inputs follow the anchor: q from N(0, 1) cast to e4m3, keys from N(0, 1) cast per key with
``sf = amax / 448``, head weights from N(0, 1); prefill key ranges in both of the anchor's forms
(causal ``[0, n - m + i)`` and its context-parallel split) plus empty and full rows; decode
contexts of every length from 0, in the 2-d (one length per row) and 1-d forms, over pages in a
shuffled, strided cache. Keys no row may see hold NaN (e4m3 0x7F) so a kernel that reads outside a
row's range fails. Expected logits are computed in float64 from the same FP8 values and judged
unrounded; where ``clean_logits`` is off, positions a row does not see are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance import oracles
from hal.conformance.case import Case, Family, Measurement, Tensors, judge
from hal.conformance.metrics import within_accumulation
from hal.ops.indexer_reference import split_paged_cache, visible_lengths

__all__ = ["MqaLogitsFamily", "PagedMqaLogitsFamily", "indexer_cases"]

NAN_E4M3 = 0x7F


def _logits64(q: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q e4m3 [m, H, D], keys e4m3 [n, D], scales [n], weights [m, H] -> float64 [m, n]."""
    scores = torch.einsum("mhd,nd->mhn", q.double(), keys.double()) * scales.double()[None, None, :]
    return torch.einsum("mhn,mh->mn", scores.relu(), weights.double())


def _ranges(kind: str, m: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "causal":  # the anchor's disable_cp form
        start = torch.zeros(m, dtype=torch.int32)
        end = torch.arange(m, dtype=torch.int32) + (n - m)
    elif kind == "cp":  # the anchor's context-parallel form: two chunks of one rank
        chunk, cp_size = m // 2, n // m
        rank = cp_size // 3
        start = torch.zeros(m, dtype=torch.int32)
        end = torch.zeros(m, dtype=torch.int32)
        for i in range(chunk):
            end[i] = rank * chunk + i
            end[i + chunk] = (cp_size * 2 - 1 - rank) * chunk + i
    else:  # random ranges, with an empty row, an inverted one and a full one
        a = torch.randint(0, n + 1, (m,), generator=generator, dtype=torch.int32)
        b = torch.randint(0, n + 1, (m,), generator=generator, dtype=torch.int32)
        start, end = torch.minimum(a, b), torch.maximum(a, b)
        start[0], end[0] = 3, 3
        start[1], end[1] = 5, 2
        start[-1], end[-1] = 0, n
    return start, end


class MqaLogitsFamily(Family):
    op = "mqa_logits"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        m, n, h, d = params["seq_len"], params["seq_len_kv"], params["heads"], params["head_dim"]
        q = torch.randn(m, h, d, generator=generator).to(torch.bfloat16).to(torch.float8_e4m3fn)
        keys, scales = hal.quantize_indexer_keys(torch.randn(n, d, generator=generator).to(torch.bfloat16))
        start, end = _ranges(params["ranges"], m, n, generator)
        seen = torch.zeros(n, dtype=torch.bool)
        for i in range(m):
            seen[int(start[i]) : int(end[i])] = True
        keys.view(torch.uint8)[~seen] = NAN_E4M3
        weights = torch.randn(m, h, generator=generator)
        compressed = int((end - start).clamp(min=0).max()) if params.get("compressed") else 0
        return {"q": q, "keys": keys, "scales": scales, "weights": weights, "start": start, "end": end,
                "max_seqlen_k": max(compressed, 1) if params.get("compressed") else 0, "bf16": bool(params.get("bf16"))}

    def run(self, inputs: Tensors) -> Tensors:
        compressed = inputs["max_seqlen_k"] > 0
        logits = hal.fp8_fp4_mqa_logits(
            inputs["q"], (inputs["keys"], inputs["scales"]), inputs["weights"], inputs["start"], inputs["end"],
            clean_logits=not compressed, max_seqlen_k=inputs["max_seqlen_k"], logits_dtype=_dtype(inputs),
        )
        return {"logits": logits}

    def expect(self, inputs: Tensors) -> Tensors:
        start, end = inputs["start"].long(), inputs["end"].long()
        full = _logits64(inputs["q"], inputs["keys"], inputs["scales"], inputs["weights"])
        n = full.shape[1]
        width = inputs["max_seqlen_k"] or n
        column = torch.arange(width)[None, :] + (start[:, None] if inputs["max_seqlen_k"] else torch.zeros_like(start)[:, None])
        seen = (column >= start[:, None]) & (column < end[:, None])
        values = full.gather(1, column.clamp(max=max(n - 1, 0))) if n else full.new_zeros(full.shape[0], width)
        return {"logits": torch.where(seen, values, -math.inf)}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list:
        magnitude = oracles.mqa_logits_oracle(inputs["q"], inputs["keys"], inputs["scales"], inputs["weights"], inputs["start"], inputs["end"],
                                              inputs["max_seqlen_k"], magnitude=True)
        return _judge_logits(self.op, got["logits"], expected["logits"], _dtype(inputs), specified_only=inputs["max_seqlen_k"] > 0,
                             magnitude=magnitude, roundings=_roundings(inputs["q"]))


class PagedMqaLogitsFamily(Family):
    op = "paged_mqa_logits"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        batch, next_n, h, d, block_kv = params["batch"], params["next_n"], params["heads"], params["head_dim"], params["block_kv"]
        lens = torch.tensor(params["lens"], dtype=torch.int32)
        two_d = params.get("two_d", True)
        if two_d:  # the anchor's form: random lengths up to the sequence's, the last row the full length
            rows = ((lens[:, None].float() + 1) * torch.rand(batch, next_n, generator=generator)).to(torch.int32)
            rows[:, -1] = lens
            context_lens = rows.contiguous()
        else:
            context_lens = lens
        visible = visible_lengths(context_lens, next_n)
        pages = [(int(visible[b].max()) + block_kv - 1) // block_kv for b in range(batch)]
        num_blocks = sum(pages) + 2
        pool = torch.randperm(num_blocks, generator=generator).to(torch.int32)
        table = torch.full((batch, max(max(pages), 1) + 1), num_blocks + 7, dtype=torch.int32)  # unread entries out of range
        used = 0
        for b, p in enumerate(pages):
            table[b, :p] = pool[used : used + p]
            used += p
        values, scales = hal.quantize_indexer_keys(torch.randn(num_blocks, block_kv, d, generator=generator).to(torch.bfloat16))
        read = torch.zeros(num_blocks, block_kv, dtype=torch.bool)
        for b in range(batch):
            for p in range(int(visible[b].max())):
                read[int(table[b, p // block_kv]), p % block_kv] = True
        values.view(torch.uint8)[~read] = NAN_E4M3
        packed = hal.pack_paged_indexer_cache(values, scales)
        if params.get("strided"):  # blocks padded apart: a cache carved out of a larger allocation
            storage = torch.zeros(num_blocks, block_kv * (d + 4) + 64, dtype=torch.uint8)
            storage[:, : block_kv * (d + 4)] = packed.view(num_blocks, -1)
            packed = storage[:, : block_kv * (d + 4)].view(num_blocks, block_kv, 1, d + 4)
        q = torch.randn(batch, next_n, h, d, generator=generator).to(torch.bfloat16).to(torch.float8_e4m3fn)
        weights = torch.randn(batch * next_n, h, generator=generator)
        width = max(int(lens.max()) if batch else 0, 1) + params.get("extra_width", 0)
        return {"q": q, "kv_cache": packed, "weights": weights, "context_lens": context_lens, "block_table": table,
                "max_context_len": width, "bf16": bool(params.get("bf16")),
                "clean": params.get("clean", True)}

    def run(self, inputs: Tensors) -> Tensors:
        lens = inputs["context_lens"]
        schedule = hal.get_paged_mqa_logits_metadata(lens if lens.dim() == 2 else lens[:, None], inputs["kv_cache"].shape[1], 8)
        logits = hal.fp8_fp4_paged_mqa_logits(
            inputs["q"], inputs["kv_cache"], inputs["weights"], lens, inputs["block_table"], schedule, inputs["max_context_len"],
            clean_logits=inputs["clean"], logits_dtype=_dtype(inputs),
        )
        return {"logits": logits}

    def expect(self, inputs: Tensors) -> Tensors:
        q = inputs["q"]
        batch, next_n, h, d = q.shape
        values, scales = split_paged_cache(inputs["kv_cache"])
        block_kv = values.shape[1]
        visible = visible_lengths(inputs["context_lens"], next_n)
        width = inputs["max_context_len"]
        out = torch.full((batch * next_n, width), -math.inf, dtype=torch.float64)
        w = inputs["weights"].view(batch, next_n, h)
        for b in range(batch):
            longest = int(visible[b].max())
            if longest == 0:
                continue
            blocks = inputs["block_table"][b, : (longest + block_kv - 1) // block_kv].long()
            keys = values[blocks].reshape(-1, d)[:longest]
            logits = _logits64(q[b], keys, scales[blocks].reshape(-1)[:longest], w[b])
            seen = torch.arange(longest)[None, :] < visible[b][:, None]
            out[b * next_n : (b + 1) * next_n, :longest] = logits.masked_fill(~seen, -math.inf)
        return {"logits": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list:
        magnitude = oracles.paged_mqa_logits_oracle(inputs["q"], inputs["kv_cache"], inputs["weights"], inputs["context_lens"], inputs["block_table"],
                                                    inputs["max_context_len"], magnitude=True)
        return _judge_logits(self.op, got["logits"], expected["logits"], _dtype(inputs), specified_only=not inputs["clean"],
                             magnitude=magnitude, roundings=_roundings(inputs["q"]))


def _dtype(inputs: Tensors) -> torch.dtype:
    return torch.bfloat16 if inputs["bf16"] else torch.float32


def _roundings(q: torch.Tensor) -> int:
    """The roundings an fp32 evaluation of one logit makes, at most: a D-term dot product per head,
    its scaling and weighting, a sum over H heads (:func:`hal.conformance.metrics.within_accumulation`)."""
    heads, dim = q.shape[-2:]
    return dim + heads + 3


def _judge_logits(op: str, logits: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, *, specified_only: bool, magnitude: torch.Tensor,
                  roundings: int) -> list:
    """Judge logits of the requested dtype; without cleaning, only positions a row sees are specified.
    Where a logit's heads cancel, the bound of "2e-6 of the largest logit" is below what fp32
    evaluation in any order gives (the reference's own error reached 1.9x it on a row of one
    visible key): an element within the fp32 accumulation interval of its terms' ``magnitude``
    (float64, the sum of their absolute values) passes, every other is judged by the bound."""
    output = "logits_bf16" if dtype == torch.bfloat16 else "logits"
    if logits.dtype != dtype:
        return [Measurement(output, "dtype", math.inf, 0.0, False, f"dtype {logits.dtype}, expected {dtype}")]
    logits = logits.double()
    if logits.shape != want.shape:
        return judge(op, output, logits, want)
    if specified_only:
        logits = torch.where(torch.isneginf(want), want, logits)
    return judge(op, output, within_accumulation(logits, want, magnitude, roundings, dtype), want)


def _name(p: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    parts = [f"{k}{p[k]}" for k in keys if k in p]
    parts += [flag for flag in ("bf16", "compressed", "strided") if p.get(flag)]
    parts += ["lens1d"] if p.get("two_d") is False else []
    parts += ["unclean"] if p.get("clean") is False else []
    return "-".join(parts)


def indexer_cases() -> list[Case]:
    prefill = MqaLogitsFamily()
    prefill_params = [
        ({"seq_len": 12, "seq_len_kv": 80, "heads": 8, "head_dim": 32, "ranges": "causal"}, True),
        ({"seq_len": 8, "seq_len_kv": 64, "heads": 16, "head_dim": 64, "ranges": "cp", "bf16": True}, True),
        ({"seq_len": 10, "seq_len_kv": 70, "heads": 4, "head_dim": 128, "ranges": "random", "compressed": True}, True),
        ({"seq_len": 256, "seq_len_kv": 2048, "heads": 64, "head_dim": 128, "ranges": "cp"}, False),
        ({"seq_len": 256, "seq_len_kv": 2048, "heads": 32, "head_dim": 128, "ranges": "causal", "bf16": True}, False),
        ({"seq_len": 128, "seq_len_kv": 4096, "heads": 64, "head_dim": 128, "ranges": "random", "compressed": True}, False),
    ]
    cases = [
        Case(prefill, _name(p, ("seq_len", "seq_len_kv", "heads", "head_dim", "ranges")), p, quick=quick, seed=700 + i)
        for i, (p, quick) in enumerate(prefill_params)
    ]
    paged = PagedMqaLogitsFamily()
    paged_params = [
        ({"batch": 3, "next_n": 2, "heads": 8, "head_dim": 64, "block_kv": 16, "lens": [40, 0, 17], "strided": True}, True),
        ({"batch": 2, "next_n": 3, "heads": 32, "head_dim": 128, "block_kv": 64, "lens": [70, 2], "two_d": False, "bf16": True}, True),
        ({"batch": 2, "next_n": 1, "heads": 16, "head_dim": 32, "block_kv": 64, "lens": [65, 128], "clean": False, "extra_width": 30}, True),
        ({"batch": 32, "next_n": 2, "heads": 64, "head_dim": 128, "block_kv": 64, "lens": [1024 + 97 * i for i in range(32)]}, False),
        ({"batch": 16, "next_n": 1, "heads": 64, "head_dim": 128, "block_kv": 64, "lens": [4096 - 33 * i for i in range(16)], "bf16": True}, False),
    ]
    cases += [
        Case(paged, _name(p, ("batch", "next_n", "heads", "head_dim", "block_kv")), p, quick=quick, seed=800 + i)
        for i, (p, quick) in enumerate(paged_params)
    ]
    return cases
