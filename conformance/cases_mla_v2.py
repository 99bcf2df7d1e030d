"""Conformance cases for FlashMLA's DeepSeek-V3.2 decode arguments and its sparse prefill.

Inputs follow FlashMLA's sparse tests: q and the cache from N(0, 1); top-k index lists drawn over
the flattened cache with some entries -1, optionally cut by ``topk_length``; the FP8 cache built
with the quantiser's reference (inputs never depend on the backend under test); sinks that mix finite values with +inf and -inf. Every
cache position no index list names holds NaN (a NaN e4m3 code in the FP8 cache), so a kernel that
reads a key it was not given fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance.case import Case, Family, Tensors, judge
from hal.ops.mla_fp8_cache import (
    LATENT,
    MODEL1_DATA_BYTES,
    MODEL1_DIM,
    MODEL1_NOPE,
    model1_pages,
    quantize_mla_kv_cache_reference,
    quantize_model1_kv_cache,
)
from hal.ops.mla_v2_reference import mla_decode_v2_reference, mla_sparse_prefill_reference

__all__ = ["MlaDecodeV2Family", "SparsePrefillFamily", "QuantizeCacheFamily", "mla_v2_cases", "quantize_cache_cases"]

PAGE = 64
D_QK = 576
NAN_E4M3 = 0x7F


def _sink(kind: str, h_q: int, generator: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    sink = torch.randn(h_q, generator=generator)
    if kind == "mixed":
        sink[0], sink[1] = math.inf, -math.inf
    return sink


def _indices(batch: int, s_q: int, topk: int, positions: int, generator: torch.Generator, duplicates: bool = False) -> torch.Tensor:
    idx = torch.stack([torch.randperm(positions, generator=generator)[:topk] for _ in range(batch * s_q)]).view(batch, s_q, topk)
    idx = idx.to(torch.int32)
    if duplicates:  # the same key named twice in a list counts twice, as in FlashMLA's kernels and reference
        idx[..., 1::4] = idx[..., 0::4][..., : idx[..., 1::4].shape[-1]]
    idx[torch.rand(batch, s_q, topk, generator=generator) < 0.15] = -1
    if batch * s_q > 1:
        idx[-1, -1] = -1  # one row that sees no key
    return idx


def _poisoned_cache(blocks: int, fp8: bool, named: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """bf16 [blocks, 64, 1, 576] (quantised when ``fp8``) with NaN at every position no index names."""
    cache = torch.randn(blocks, PAGE, 1, D_QK, generator=generator).to(torch.bfloat16)
    unused = torch.ones(blocks * PAGE, dtype=torch.bool)
    unused[named[named >= 0].long()] = False
    if not fp8:
        cache.view(-1, D_QK)[unused] = math.nan
        return cache
    quantised = quantize_mla_kv_cache_reference(cache)
    raw = quantised.view(torch.uint8).view(-1, quantised.shape[-1])
    raw[unused, :LATENT] = NAN_E4M3
    return quantised


def _poisoned_model1(blocks: int, page: int, named: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """FlashMLA's MODEL1_FP8Sparse cache of ``blocks`` pages of ``page`` tokens, NaN codes at every
    position no index names (so a kernel that reads one shows it)."""
    cache = quantize_model1_kv_cache(torch.randn(blocks, page, 1, MODEL1_DIM, generator=generator).to(torch.bfloat16))
    unused = torch.ones(blocks * page, dtype=torch.bool)
    unused[named[named >= 0].long()] = False
    data = model1_pages(cache)[:, : page * MODEL1_DATA_BYTES].view(blocks, page, MODEL1_DATA_BYTES)  # a view: writes land in the cache
    data[unused.view(blocks, page), :MODEL1_NOPE] = NAN_E4M3
    return cache


class MlaDecodeV2Family(Family):
    op = "mla_decode_v2"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        batch, s_q, h_q = params["batch"], params["s_q"], params["h_q"]
        model1 = params.get("model1", False)  # FlashMLA's d_qk 512 with its MODEL1 FP8 cache
        q = torch.randn(batch, s_q, h_q, MODEL1_DIM if model1 else D_QK, generator=generator).to(torch.bfloat16)
        sink = _sink(params.get("sink", "none"), h_q, generator)
        if params["mode"] == "dense":
            seqlens = list(params["seqlens"])
            pages = [math.ceil(s / PAGE) for s in seqlens]
            blocks = sum(pages) + 2
            table = torch.full((batch, max(max(pages), 1) + 1), blocks - 1, dtype=torch.int32)
            named = []
            used = 0
            for b, (n, p) in enumerate(zip(seqlens, pages)):
                table[b, :p] = torch.arange(used, used + p)
                named += [int(table[b, t // PAGE]) * PAGE + t % PAGE for t in range(n)]
                used += p
            cache = _poisoned_cache(blocks, params["fp8"], torch.tensor(named, dtype=torch.int64), generator)
            return {"q": q, "k_cache": cache, "block_table": table, "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32),
                    "causal": params.get("causal", False), "fp8": params["fp8"], "indices": None, "attn_sink": sink,
                    "extra_k_cache": None, "extra_indices": None, "topk_length": None, "extra_topk_length": None}
        topk, blocks = params["topk"], params["blocks"]
        page, extra_page = params.get("page", PAGE), params.get("extra_page", PAGE)

        def poisoned(count: int, size: int, named: torch.Tensor) -> torch.Tensor:
            return _poisoned_model1(count, size, named, generator) if model1 else _poisoned_cache(count, params["fp8"], named, generator)

        indices = _indices(batch, s_q, topk, blocks * page, generator, duplicates=params.get("duplicates", False))
        topk_length = torch.randint(0, topk + 1, (batch,), generator=generator, dtype=torch.int32) if params.get("topk_length") else None
        extra = extra_indices = extra_length = None
        if params.get("extra_topk"):
            extra_blocks = max(2, -(-params["extra_topk"] // extra_page) + 1)
            extra_indices = _indices(batch, s_q, params["extra_topk"], extra_blocks * extra_page, generator)
            extra = poisoned(extra_blocks, extra_page, extra_indices.flatten().long())
            extra_length = torch.randint(0, params["extra_topk"] + 1, (batch,), generator=generator, dtype=torch.int32) if params.get("topk_length") else None
        named = indices if topk_length is None else torch.where(torch.arange(topk)[None, None, :] < topk_length[:, None, None], indices, -1)
        cache = poisoned(blocks, page, named.flatten().long())
        return {"q": q, "k_cache": cache, "block_table": None, "cache_seqlens": None, "causal": False, "fp8": params["fp8"],
                "indices": indices, "attn_sink": sink, "extra_k_cache": extra, "extra_indices": extra_indices,
                "topk_length": topk_length, "extra_topk_length": extra_length}

    def run(self, inputs: Tensors) -> Tensors:
        schedule, _ = hal.get_mla_metadata()
        out, lse = hal.flash_mla_with_kvcache(
            inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], 512, schedule, None,
            causal=inputs["causal"], is_fp8_kvcache=inputs["fp8"], indices=inputs["indices"], attn_sink=inputs["attn_sink"],
            extra_k_cache=inputs["extra_k_cache"], extra_indices_in_kvcache=inputs["extra_indices"],
            topk_length=inputs["topk_length"], extra_topk_length=inputs["extra_topk_length"],
        )
        return {"out": out, "lse": lse}

    def expect(self, inputs: Tensors) -> Tensors:
        q = inputs["q"]
        out, lse = mla_decode_v2_reference(
            q.float(), inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], 512, q.shape[-1] ** -0.5,
            inputs["causal"] and q.shape[1] > 1, inputs["fp8"], inputs["indices"], inputs["attn_sink"], inputs["extra_k_cache"],
            inputs["extra_indices"], inputs["topk_length"], inputs["extra_topk_length"],
        )
        return {"out": out, "lse": lse}  # out unrounded (fp32): judged at the bf16 bound

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list:
        return judge(self.op, "out", got["out"].float(), expected["out"]) + judge(self.op, "lse", got["lse"], expected["lse"])


class SparsePrefillFamily(Family):
    op = "mla_sparse_prefill"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        s_q, s_kv, h_q, h_kv, topk = params["s_q"], params["s_kv"], params["h_q"], params["h_kv"], params["topk"]
        d_qk = params.get("d_qk", D_QK)
        q = torch.randn(s_q, h_q, d_qk, generator=generator).to(torch.bfloat16)
        kv = torch.randn(s_kv, h_kv, d_qk, generator=generator).to(torch.bfloat16)
        indices = torch.randint(-1, s_kv + 3, (s_q, h_kv, topk), generator=generator, dtype=torch.int32)  # some unused
        indices[0] = -1  # a token that sees no key
        named = torch.zeros(s_kv, h_kv, dtype=torch.bool)
        for g in range(h_kv):
            valid = indices[:, g][(indices[:, g] >= 0) & (indices[:, g] < s_kv)]
            named[valid.long(), g] = True
        kv[~named] = math.nan
        topk_length = torch.randint(0, topk + 1, (s_q,), generator=generator, dtype=torch.int32) if params.get("topk_length") else None
        if topk_length is not None:  # keys named only past a token's cut must not be read: re-poison from the cut lists
            named[:] = False
            for t in range(s_q):
                for g in range(h_kv):
                    row = indices[t, g, : int(topk_length[t])]
                    named[row[(row >= 0) & (row < s_kv)].long(), g] = True
            kv[~named] = math.nan
        return {"q": q, "kv": kv, "indices": indices, "attn_sink": _sink(params.get("sink", "none"), h_q, generator), "topk_length": topk_length}

    def run(self, inputs: Tensors) -> Tensors:
        out, max_logits, lse = hal.flash_mla_sparse_fwd(
            inputs["q"], inputs["kv"], inputs["indices"], inputs["q"].shape[-1] ** -0.5, attn_sink=inputs["attn_sink"], topk_length=inputs["topk_length"]
        )
        return {"out": out, "max_logits": max_logits, "lse": lse}

    def expect(self, inputs: Tensors) -> Tensors:
        out, max_logits, lse = mla_sparse_prefill_reference(
            inputs["q"], inputs["kv"], inputs["indices"], inputs["q"].shape[-1] ** -0.5, 512, inputs["attn_sink"], inputs["topk_length"]
        )
        return {"out": out, "max_logits": max_logits, "lse": lse}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list:
        return [m for name in ("out", "max_logits", "lse") for m in judge(self.op, name, got[name].float() if name == "out" else got[name], expected[name].float() if name == "out" else expected[name])]


def _v2_name(p: Mapping[str, Any]) -> str:
    parts = [p["mode"], f"b{p['batch']}", f"sq{p['s_q']}", f"h{p['h_q']}"]
    parts += [f"topk{p['topk']}"] if p["mode"] == "sparse" else ["sk" + "_".join(map(str, p["seqlens"]))]
    parts += ["m1" if p.get("model1") else "fp8" if p["fp8"] else "bf16"]  # m1: the MODEL1 FP8 cache (d_qk 512)
    parts += [f"p{p['page']}"] if p.get("page") else []
    parts += [f"sink-{p['sink']}"] if p.get("sink", "none") != "none" else []
    parts += [f"extra{p['extra_topk']}" + (f"p{p['extra_page']}" if p.get("extra_page") else "")] if p.get("extra_topk") else []
    parts += ["topklen"] if p.get("topk_length") else []
    parts += ["causal"] if p.get("causal") else []
    parts += ["dup"] if p.get("duplicates") else []
    parts += [f"cache{p['blocks'] * PAGE}"] if p["mode"] == "sparse" and p["blocks"] * PAGE >= 32768 else []
    return "-".join(parts)


def mla_v2_cases() -> list[Case]:
    decode = MlaDecodeV2Family()
    quick = [
        {"mode": "sparse", "batch": 2, "s_q": 1, "h_q": 16, "topk": 64, "blocks": 4, "fp8": True},
        {"mode": "sparse", "batch": 2, "s_q": 2, "h_q": 16, "topk": 96, "blocks": 3, "fp8": True, "sink": "mixed", "topk_length": True},
        {"mode": "sparse", "batch": 1, "s_q": 2, "h_q": 32, "topk": 64, "blocks": 2, "fp8": True, "extra_topk": 32, "topk_length": True},
        {"mode": "sparse", "batch": 2, "s_q": 1, "h_q": 16, "topk": 48, "blocks": 2, "fp8": False, "sink": "mixed"},
        {"mode": "dense", "batch": 3, "s_q": 2, "h_q": 16, "seqlens": [130, 1, 0], "fp8": True, "causal": True, "sink": "mixed"},
        {"mode": "sparse", "batch": 2, "s_q": 1, "h_q": 16, "topk": 64, "blocks": 3, "fp8": True, "duplicates": True},
        # FlashMLA's d_qk 512: the MODEL1 FP8 cache, odd page sizes, an extra cache of 2-token pages
        {"mode": "sparse", "batch": 2, "s_q": 2, "h_q": 16, "topk": 64, "blocks": 3, "page": 61, "fp8": True, "model1": True, "sink": "mixed",
         "topk_length": True, "extra_topk": 32, "extra_page": 2},
    ]
    full = [
        {"mode": "sparse", "batch": b, "s_q": s_q, "h_q": h, "topk": 2048, "blocks": 64, "fp8": True, "sink": "mixed", "topk_length": True}
        for b in (1, 16) for s_q in (1, 2) for h in (64, 128)
    ]
    # A 32k-token cache (512 pages), the sizes DeepSeek-V3.2 serves.
    full += [{"mode": "sparse", "batch": 4, "s_q": 1, "h_q": 128, "topk": 2048, "blocks": 512, "fp8": True, "sink": "mixed", "topk_length": True}]
    # FlashMLA's MODEL1 production shape: 256-token pages, an extra cache of 64-token pages
    full += [{"mode": "sparse", "batch": 8, "s_q": 2, "h_q": 64, "topk": 128, "blocks": 64, "page": 256, "fp8": True, "model1": True,
              "sink": "mixed", "topk_length": True, "extra_topk": 512, "extra_page": 64}]
    cases = [Case(decode, _v2_name(p), p, quick=True, seed=400 + i) for i, p in enumerate(quick)]
    cases += [Case(decode, _v2_name(p), p, quick=False, seed=500 + i) for i, p in enumerate(full)]
    prefill = SparsePrefillFamily()
    prefill_params = [
        ({"s_q": 6, "s_kv": 90, "h_q": 16, "h_kv": 1, "topk": 32}, True),
        ({"s_q": 5, "s_kv": 70, "h_q": 32, "h_kv": 2, "topk": 16, "sink": "mixed", "topk_length": True}, True),
        ({"s_q": 256, "s_kv": 4096, "h_q": 128, "h_kv": 1, "topk": 2048, "sink": "mixed"}, False),
        # d_qk = 512 (FlashMLA's prefill tests run 512 and 576): V is the whole key
        ({"s_q": 5, "s_kv": 80, "h_q": 16, "h_kv": 1, "topk": 32, "sink": "mixed", "topk_length": True, "d_qk": 512}, True),
        ({"s_q": 128, "s_kv": 4096, "h_q": 64, "h_kv": 1, "topk": 2048, "d_qk": 512}, False),
    ]
    for i, (p, quick_case) in enumerate(prefill_params):
        name = f"sq{p['s_q']}-skv{p['s_kv']}-h{p['h_q']}x{p['h_kv']}-topk{p['topk']}" + ("-sink" if p.get("sink") else "") + ("-topklen" if p.get("topk_length") else "")
        name += f"-dqk{p['d_qk']}" if "d_qk" in p else ""
        cases.append(Case(prefill, name, p, quick=quick_case, seed=600 + i))
    return cases


class QuantizeCacheFamily(Family):
    """The FP8 cache writer: bit-exact records. Tiles at the scale clamp (amax / 448 < 1e-4), exact
    powers of two at the rounding boundary, all-zero tiles, one NaN and fp16/fp32 inputs."""

    op = "quantize_mla_kv_cache"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        blocks, page = params["blocks"], params["page"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[params["dtype"]]
        x = torch.randn(blocks, page, 1, D_QK, generator=generator) * torch.exp2(torch.randint(-8, 6, (blocks, page, 1, 1), generator=generator).float())
        tokens = x.view(-1, D_QK)
        tokens[0, :128] *= 1e-4  # amax / 448 far under the 1e-4 clamp
        tokens[0, 128:256] = 0.0
        tokens[1, 256:384] = tokens[1, 256:384].clamp(-1, 1)
        tokens[1, 300] = 448.0 * 2.0**-5  # amax / 448 exactly a power of two
        if params.get("nan"):
            tokens[-1, 400] = math.nan
        x = x.to(dtype)
        if params.get("strided"):
            x = torch.cat([x, x], dim=1)[:, ::2]  # a page of every other token
        return {"k_cache": x}

    def run(self, inputs: Tensors) -> Tensors:
        return {"records": _canonical_nans(hal.quantize_mla_kv_cache(inputs["k_cache"]))}

    def expect(self, inputs: Tensors) -> Tensors:
        return {"records": _canonical_nans(quantize_mla_kv_cache_reference(inputs["k_cache"]))}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list:
        return judge(self.op, "records", got["records"], expected["records"])


def _canonical_nans(cache: torch.Tensor) -> torch.Tensor:
    """The records' bytes with every NaN written one way: a NaN's sign and payload are not part of
    the contract (hardware differs), its position is. Returns uint8 [..., 656]."""
    raw = cache.view(torch.uint8).clone()
    codes = raw[..., :LATENT]
    codes[(codes & 0x7F) == 0x7F] = NAN_E4M3
    scales = raw[..., LATENT : LATENT + 16].contiguous().view(torch.float32)
    scales[torch.isnan(scales)] = math.nan
    raw[..., LATENT : LATENT + 16] = scales.view(torch.uint8)
    rope = raw[..., LATENT + 16 :].contiguous().view(torch.bfloat16)
    rope[torch.isnan(rope)] = math.nan
    raw[..., LATENT + 16 :] = rope.view(torch.uint8)
    return raw


def quantize_cache_cases() -> list[Case]:
    family = QuantizeCacheFamily()
    params = [
        ({"blocks": 3, "page": 64, "dtype": "bf16", "nan": True}, True),
        ({"blocks": 2, "page": 16, "dtype": "fp16", "strided": True}, True),
        ({"blocks": 2, "page": 8, "dtype": "fp32"}, True),
        ({"blocks": 256, "page": 64, "dtype": "bf16"}, False),
    ]
    return [
        Case(family, f"{p['blocks']}x{p['page']}-{p['dtype']}" + ("-nan" if p.get("nan") else "") + ("-strided" if p.get("strided") else ""),
             p, quick=quick, seed=900 + i)
        for i, (p, quick) in enumerate(params)
    ]
