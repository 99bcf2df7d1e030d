"""Adversarial calls: every public operator, one mutation per call, each outcome classified.

A seeded generator builds valid arguments for an operator, applies one mutation (a dtype, a rank,
a shape, strides, a zero size, NaN or inf, an out-of-range or negative id, an edge K or N, a
masked count...) whose validity under the contract is known, calls the public ``hal`` function
on a chosen backend, and classifies the outcome:

- ``typed error``: an invalid call raised a :class:`hal.HalError` (what the contract asks);
- ``correct``: a valid call matched the float64 oracle of :mod:`hal.conformance.oracles`
  (non-finite positions exactly, finite values within the conformance bounds);
- ``defect``: anything else: an untyped exception, a wrong or silently "repaired" result, an
  invalid call accepted, a valid call refused;
- ``unsupported``: the backend raised OperatorNotSupportedError for a feature it says it lacks.

::

    python -m hal.conformance.adversarial --backend opencl --calls 2000 --seed 7

``run(backend, calls, seed)`` returns the outcomes; the test suite runs a CI-sized budget on
every CPU-runnable backend (``HAL_ADVERSARIAL_CALLS`` sets a larger, nightly-sized one).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import hal
from hal.conformance import oracles
from hal.conformance.case import judge
from hal.conformance.metrics import within_accumulation
from hal.ops.gemm import rows_by_block
from hal.ops.mla_fp8_cache import model1_pages, quantize_mla_kv_cache_reference

__all__ = ["Outcome", "OPERATORS", "run", "summarise", "main"]

FP8 = torch.float8_e4m3fn
WRONG_DTYPES = (torch.float64, torch.int32, torch.bool, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float16)
Args = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    op: str
    mutation: str
    valid: bool | None  # None: either a typed error or a correct result is acceptable
    verdict: str  # "typed error", "correct" or "defect"
    detail: str = ""


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[Args, random.Random], Args]
    valid: bool | None


@dataclass(frozen=True)
class Operator:
    """How to build, call and judge one public operator."""

    name: str
    make: Callable[[random.Random], Args]
    call: Callable[[Args], Any]
    judge: Callable[[Args, Any], str | None]  # a problem with a result of a valid call, or None
    mutations: tuple[Mutation, ...]
    operator: str = ""  # the hal operator when ``name`` is a variant of its calls (``gemm_fp8_nt.v2``)

    @property
    def hal_operator(self) -> str:
        return self.operator or self.name


# --- helpers ---------------------------------------------------------------------------------


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def _cast_lhs(m: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM-style per-token cast with K padded to whole blocks: (row-strided view [m, k], scales)."""
    padded = -(-k // 128) * 128
    x = torch.zeros(m, padded)
    x[:, :k] = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    values, scales = hal.ops.fp8_quant.per_token_cast_reference(x)
    return values[:, :k], scales


def _cast_rhs(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    padded = -(-k // 128) * 128
    x = torch.zeros(n, padded)
    x[:, :k] = torch.randn(n, k, generator=g)
    values, scales = hal.ops.fp8_quant.per_block_cast_reference(x)
    return values[:, :k].contiguous(), scales


def _replace(args: Args, **changes: Any) -> Args:
    return {**args, **changes}


def _pair(args: Args, key: str, index: int, value: torch.Tensor) -> Args:
    pair = list(args[key])
    pair[index] = value
    return _replace(args, **{key: tuple(pair)})


def _poke(tensor: torch.Tensor, value: float, rng: random.Random) -> torch.Tensor:
    t = tensor.clone()
    if t.numel():
        flat = t.view(-1)
        flat[rng.randrange(flat.numel())] = value
    return t


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, not contiguous: every other element of a wider last dimension."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _compare(op: str, output: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    failed = [m for m in judge(op, output, got.cpu(), want) if not m.passed]
    return "; ".join(f"{m.output} {m.metric}={m.value:.3g} {m.note}" for m in failed) or None


def _all_exact(names: tuple[str, ...], got: Any, want: Any) -> str | None:
    """The first of several outputs that is not bit-identical to the oracle's, described."""
    return next((p for p in (_exact(n, g, w) for n, g, w in zip(names, got, want)) if p), None)


def _exact(name: str, got: torch.Tensor | None, want: torch.Tensor | None) -> str | None:
    if got is None or want is None:
        return None if got is None and want is None else f"{name}: expected {'None' if want is None else 'a tensor'}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: {got.dtype} {list(got.shape)} != {want.dtype} {list(want.shape)}"
    same = got.cpu().view(torch.uint8).equal(want.view(torch.uint8)) if got.dtype in (FP8, torch.bool) else torch.equal(got.cpu(), want)
    return None if same else f"{name}: differs"


# --- FP8 GEMMs -------------------------------------------------------------------------------


def _make_dense(rng: random.Random) -> Args:
    g = _gen(rng)
    m, n, k = rng.choice([1, 5, 33]), rng.choice([64, 128, 200]), rng.choice([128, 256])
    return {"lhs": _cast_lhs(m, k, g), "rhs": _cast_rhs(n, k, g), "out": torch.empty(m, n, dtype=torch.bfloat16)}


def _resized_dense(m: int | None = None, n: int | None = None, k: int | None = None) -> Callable[[Args, random.Random], Args]:
    def apply(args: Args, rng: random.Random) -> Args:
        g = _gen(rng)
        m0, k0 = args["lhs"][0].shape
        n0 = args["rhs"][0].shape[0]
        mm, nn, kk = m if m is not None else m0, n if n is not None else n0, k if k is not None else k0
        return {"lhs": _cast_lhs(mm, kk, g), "rhs": _cast_rhs(nn, kk, g), "out": torch.empty(mm, nn, dtype=torch.bfloat16)}

    return apply


def _judge_dense(args: Args, result: Any) -> str | None:
    want = oracles.gemm_oracle(args["lhs"][0], args["lhs"][1], args["rhs"][0], args["rhs"][1])
    return _compare("gemm_fp8_nt", "out", args["out"], want)


DENSE = Operator(
    "gemm_fp8_nt",
    _make_dense,
    lambda a: hal.gemm_fp8_fp8_bf16_nt(a["lhs"], a["rhs"], a["out"]),
    _judge_dense,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("K = 64 (one partial block)", _resized_dense(k=64), True),
        Mutation("K = 576 (DeepGEMM's test)", _resized_dense(k=576), True),
        Mutation("K = 200", _resized_dense(k=200), True),
        Mutation("N = 1", _resized_dense(n=1), True),
        Mutation("N = 129", _resized_dense(n=129), True),
        Mutation("M = 0", _resized_dense(m=0), True),
        Mutation("NaN in an lhs scale", lambda a, r: _pair(a, "lhs", 1, _poke(a["lhs"][1], math.nan, r)), True),
        Mutation("inf in an rhs scale", lambda a, r: _pair(a, "rhs", 1, _poke(a["rhs"][1], math.inf, r)), True),
        Mutation("NaN code in lhs", lambda a, r: _pair(a, "lhs", 0, _poke(a["lhs"][0].contiguous(), math.nan, r)), True),
        Mutation("column-major lhs scales", lambda a, r: _pair(a, "lhs", 1, a["lhs"][1].t().contiguous().t()), True),
        *(Mutation(f"lhs dtype {d}", (lambda d: lambda a, r: _pair(a, "lhs", 0, a["lhs"][0].float().to(d)))(d), False) for d in WRONG_DTYPES),
        Mutation("rhs scales float64", lambda a, r: _pair(a, "rhs", 1, a["rhs"][1].double()), False),
        Mutation("out float32", lambda a, r: _replace(a, out=a["out"].float()), False),
        Mutation("out not contiguous", lambda a, r: _replace(a, out=_strided(a["out"])), False),
        Mutation("out requires grad", lambda a, r: _replace(a, out=a["out"].float().requires_grad_().bfloat16().detach().requires_grad_()), False),
        Mutation("out one column short", lambda a, r: _replace(a, out=a["out"][:, :-1].contiguous()), False),
        Mutation("lhs rank 3", lambda a, r: _pair(a, "lhs", 0, a["lhs"][0].unsqueeze(0)), False),
        Mutation("lhs not K-major", lambda a, r: _pair(a, "lhs", 0, _strided(a["lhs"][0].contiguous())), False),
        Mutation("rhs K one short", lambda a, r: _pair(a, "rhs", 0, a["rhs"][0][:, :-1].contiguous()), False),
        Mutation("lhs scales one column short", lambda a, r: _pair(a, "lhs", 1, a["lhs"][1][:, :-1]), False),
        Mutation("lhs on the meta device", lambda a, r: _pair(a, "lhs", 0, a["lhs"][0].to("meta")), False),
        Mutation("lhs not a pair", lambda a, r: _replace(a, lhs=a["lhs"][0]), False),
    ),
)


def _make_contiguous(rng: random.Random) -> Args:
    g = _gen(rng)
    groups, n, k = rng.choice([1, 3]), rng.choice([64, 128]), rng.choice([128, 256])
    sizes = [rng.choice([0, 1, 100, 128]) for _ in range(groups)]
    ids = []
    for group, size in enumerate(sizes):
        ids += [group] * size + [-1] * (-(-size // 128) * 128 - size)
    m_indices = torch.tensor(ids or [-1] * 128, dtype=torch.int32)
    b = [_cast_rhs(n, k, g) for _ in range(groups)]
    return {
        "lhs": _cast_lhs(m_indices.numel(), k, g), "rhs": (torch.stack([x for x, _ in b]), torch.stack([s for _, s in b])),
        "out": torch.full((m_indices.numel(), n), math.nan, dtype=torch.bfloat16), "m_indices": m_indices,
    }


def _judge_contiguous(args: Args, result: Any) -> str | None:
    computed = rows_by_block(args["m_indices"])  # -1 rows in a group's block are computed with it
    want = oracles.grouped_contiguous_oracle(args["lhs"][0], args["lhs"][1], args["rhs"][0], args["rhs"][1], computed)
    rows = computed >= 0
    return _compare("m_grouped_gemm_fp8_nt_contiguous", "out", args["out"][rows], want[rows])


def _with_index(key: str, value: int) -> Callable[[Args, random.Random], Args]:
    def apply(args: Args, rng: random.Random) -> Args:
        return _replace(args, **{key: _poke(args[key], value, rng)})

    return apply


CONTIGUOUS = Operator(
    "m_grouped_gemm_fp8_nt_contiguous",
    _make_contiguous,
    lambda a: hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a["lhs"], a["rhs"], a["out"], a["m_indices"]),
    _judge_contiguous,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("a group id past G", lambda a, r: _replace(a, m_indices=torch.where(a["m_indices"] >= 0, a["rhs"][0].shape[0], -1).to(torch.int32)), None),
        Mutation("group id -2", _with_index("m_indices", -2), False),
        Mutation("m_indices int64", lambda a, r: _replace(a, m_indices=a["m_indices"].long()), False),
        Mutation("M not a multiple of 128", lambda a, r: _replace(a, lhs=(a["lhs"][0][:-1], a["lhs"][1][:-1]), out=a["out"][:-1], m_indices=a["m_indices"][:-1]), False),
        Mutation("rhs scales of another group count", lambda a, r: _pair(a, "rhs", 1, torch.cat([a["rhs"][1], a["rhs"][1][:1]])), False),
    ),
)


def _make_masked(rng: random.Random) -> Args:
    g = _gen(rng)
    groups, m_max, n, k = rng.choice([1, 3]), rng.choice([8, 32]), rng.choice([64, 128]), rng.choice([128, 256])
    a = [_cast_lhs(m_max, k, g) for _ in range(groups)]
    b = [_cast_rhs(n, k, g) for _ in range(groups)]
    masked = torch.tensor([rng.randint(0, m_max) for _ in range(groups)], dtype=torch.int32)
    return {
        "lhs": (torch.stack([x.contiguous() for x, _ in a]), torch.stack([s for _, s in a])),
        "rhs": (torch.stack([x for x, _ in b]), torch.stack([s for _, s in b])),
        "out": torch.full((groups, m_max, n), math.nan, dtype=torch.bfloat16), "masked_m": masked, "expected_m": max(1, m_max // 2),
    }


def _judge_masked(args: Args, result: Any) -> str | None:
    want = oracles.grouped_masked_oracle(args["lhs"][0], args["lhs"][1], args["rhs"][0], args["rhs"][1], args["masked_m"])
    rows = torch.arange(args["out"].shape[1])[None, :] < args["masked_m"][:, None]
    problem = _compare("m_grouped_gemm_fp8_nt_masked", "out", args["out"][rows], want[rows])
    if problem is None and not bool(torch.isnan(args["out"][~rows]).all()):
        problem = "rows at or beyond masked_m were written"
    return problem


MASKED = Operator(
    "m_grouped_gemm_fp8_nt_masked",
    _make_masked,
    lambda a: hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a["lhs"], a["rhs"], a["out"], a["masked_m"], a["expected_m"]),
    _judge_masked,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("every masked count 0", lambda a, r: _replace(a, masked_m=torch.zeros_like(a["masked_m"])), True),
        Mutation("masked count past M_max", lambda a, r: _replace(a, masked_m=a["masked_m"] + a["out"].shape[1] + 1), False),
        Mutation("negative masked count", _with_index("masked_m", -1), False),
        Mutation("expected_m 0", lambda a, r: _replace(a, expected_m=0), False),
        Mutation("expected_m float", lambda a, r: _replace(a, expected_m=2.0), False),
        Mutation("lhs with one group fewer", lambda a, r: _replace(a, lhs=(a["lhs"][0][:-1], a["lhs"][1][:-1])) if a["lhs"][0].shape[0] > 1 else _replace(a, lhs=(a["lhs"][0][:, :0], a["lhs"][1])), False),
    ),
)


# --- FP8 casts -------------------------------------------------------------------------------


def _make_cast(rng: random.Random) -> Args:
    g = _gen(rng)
    rows, cols = rng.choice([1, 7, 130]), rng.choice([128, 256])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    return {"x": (torch.randn(rows, cols, generator=g) * math.exp(rng.uniform(-6, 6))).to(dtype)}


def _judge_cast(op: str, oracle: Callable) -> Callable[[Args, Any], str | None]:
    def check(args: Args, result: Any) -> str | None:
        values, scales = result
        want_values, want_scales = oracle(args["x"])
        if values.dtype != FP8:
            return f"values dtype {values.dtype}"
        if op == "per_token_cast_to_fp8":
            got = values.double().view(values.shape[0], values.shape[1] // 128, 128) * scales.double().unsqueeze(-1)
            got = got.view(values.shape)
        else:
            got = values.double() * scales.double().repeat_interleave(128, 0)[: values.shape[0]].repeat_interleave(128, 1)[:, : values.shape[1]]
        return _compare(op, "scales", scales, want_scales.float()) or _compare(op, "dequantized", got.float(), want_values.float())

    return check


def _cast_operator(op: str, call: Callable, oracle: Callable, extra: tuple[Mutation, ...]) -> Operator:
    return Operator(
        op, _make_cast, lambda a: call(a["x"]), _judge_cast(op, oracle),
        (
            Mutation("none", lambda a, r: a, True),
            Mutation("NaN in x", lambda a, r: _replace(a, x=_poke(a["x"], math.nan, r)), True),
            Mutation("inf in x", lambda a, r: _replace(a, x=_poke(a["x"], math.inf, r)), True),
            Mutation("all zeros", lambda a, r: _replace(a, x=torch.zeros_like(a["x"])), True),
            Mutation("zero rows", lambda a, r: _replace(a, x=a["x"][:0]), True),
            Mutation("x not contiguous", lambda a, r: _replace(a, x=_strided(a["x"])), None),
            *(Mutation(f"x dtype {d}", (lambda d: lambda a, r: _replace(a, x=a["x"].to(d)))(d), False) for d in (torch.float64, torch.int32, torch.bool, FP8)),
            Mutation("x rank 3", lambda a, r: _replace(a, x=a["x"].unsqueeze(0)), False),
            Mutation("x on the meta device", lambda a, r: _replace(a, x=a["x"].to("meta")), False),
            *extra,
        ),
    )


PER_TOKEN = _cast_operator(
    "per_token_cast_to_fp8", hal.per_token_cast_to_fp8, oracles.per_token_cast_oracle,
    (Mutation("K = 200", lambda a, r: _replace(a, x=a["x"][:, :200] if a["x"].shape[1] > 200 else torch.cat([a["x"], a["x"][:, :72]], 1)), None),),
)
PER_BLOCK = _cast_operator(
    "per_block_cast_to_fp8", hal.per_block_cast_to_fp8, oracles.per_block_cast_oracle,
    (Mutation("K = 200 (partial block)", lambda a, r: _replace(a, x=torch.cat([a["x"], a["x"]], 1)[:, :200].contiguous()), True),),
)


# --- MLA decode ------------------------------------------------------------------------------


def _make_mla(rng: random.Random) -> Args:
    g = _gen(rng)
    batch, s_q, h_q = rng.choice([1, 3]), rng.choice([1, 2]), rng.choice([16, 32])
    seqlens = [rng.choice([0, 1, 63, 64, 65, 200]) for _ in range(batch)]
    pages = [-(-s // 64) for s in seqlens]
    blocks = sum(pages) + 1
    k_cache = torch.randn(blocks, 64, 1, 576, generator=g).to(torch.bfloat16)
    k_cache[-1] = math.nan  # a block no sequence uses
    table = torch.full((batch, max(max(pages), 1) + 1), blocks - 1, dtype=torch.int32)  # unused entries: the NaN block
    used = 0
    for b, (length, p) in enumerate(zip(seqlens, pages)):
        table[b, :p] = torch.arange(used, used + p)
        used += p
        if length % 64:
            k_cache[int(table[b, p - 1]), length % 64:] = math.nan  # slots past the end
    return {
        "q": torch.randn(batch, s_q, h_q, 576, generator=g).to(torch.bfloat16), "k_cache": k_cache, "block_table": table,
        "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32), "causal": rng.random() < 0.5, "softmax_scale": None,
    }


def _call_mla(a: Args) -> Any:
    metadata, splits = hal.get_mla_metadata(a["cache_seqlens"], max(a["q"].shape[1] * a["q"].shape[2], 1), 1)
    return hal.flash_mla_with_kvcache(
        a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], 512, metadata, splits, softmax_scale=a["softmax_scale"], causal=a["causal"]
    )


def _judge_mla(args: Args, result: Any) -> str | None:
    out, lse = result
    want_out, want_lse = oracles.mla_oracle(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], args["causal"], args["softmax_scale"])
    return _compare("mla_decode", "out", out.float(), want_out.float()) or _compare("mla_decode", "lse", lse, want_lse.float())


def _used_page(a: Args) -> tuple[int, int] | None:
    for b, n in enumerate(a["cache_seqlens"].tolist()):
        if n:
            return b, 0
    return None


def _table_entry(value: int) -> Callable[[Args, random.Random], Args]:
    def apply(a: Args, r: random.Random) -> Args:
        where = _used_page(a)
        if where is None:
            a = _replace(a, cache_seqlens=torch.full_like(a["cache_seqlens"], 1))
            where = (0, 0)
        table = a["block_table"].clone()
        table[where] = value
        return _replace(a, block_table=table)

    return apply


def _key_value(value: float, channel: int) -> Callable[[Args, random.Random], Args]:
    def apply(a: Args, r: random.Random) -> Args:
        where = _used_page(a)
        if where is None:
            return a
        k = a["k_cache"].clone()
        k[int(a["block_table"][where]), 0, 0, channel] = value
        return _replace(a, k_cache=k)

    return apply


MLA = Operator(
    "mla_decode",
    _make_mla,
    _call_mla,
    _judge_mla,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("NaN in q", lambda a, r: _replace(a, q=_poke(a["q"], math.nan, r)), True),
        Mutation("inf in q", lambda a, r: _replace(a, q=_poke(a["q"], math.inf, r)), True),
        Mutation("-inf in q", lambda a, r: _replace(a, q=_poke(a["q"], -math.inf, r)), True),
        Mutation("NaN in a used key", _key_value(math.nan, 300), True),
        Mutation("inf in a used key's rope", _key_value(math.inf, 550), True),
        Mutation("inf in a used value channel", _key_value(math.inf, 5), True),
        Mutation("every sequence empty", lambda a, r: _replace(a, cache_seqlens=torch.zeros_like(a["cache_seqlens"])), True),
        Mutation("s_q = 0", lambda a, r: _replace(a, q=a["q"][:, :0]), True),
        Mutation("softmax_scale 0.01", lambda a, r: _replace(a, softmax_scale=0.01), True),
        Mutation("fp16", lambda a, r: _replace(a, q=a["q"].half(), k_cache=a["k_cache"].half()), True),
        Mutation("block id past the cache", _table_entry(10**6), False),
        Mutation("negative block id in a used page", _table_entry(-1), False),
        Mutation("sequence longer than its table", lambda a, r: _replace(a, cache_seqlens=a["cache_seqlens"] + 64 * a["block_table"].shape[1] + 1), False),
        Mutation("negative sequence length", _with_index("cache_seqlens", -1), False),
        Mutation("q float32", lambda a, r: _replace(a, q=a["q"].float()), False),
        Mutation("k_cache of another dtype", lambda a, r: _replace(a, k_cache=a["k_cache"].half()), False),
        Mutation("q head dim 512", lambda a, r: _replace(a, q=a["q"][..., :512]), False),
        Mutation("softmax_scale NaN", lambda a, r: _replace(a, softmax_scale=math.nan), False),
        Mutation("block_table int64", lambda a, r: _replace(a, block_table=a["block_table"].long()), False),
        Mutation("q on the meta device", lambda a, r: _replace(a, q=a["q"].to("meta")), False),
    ),
)


# --- MLA, DeepSeek-V3.2 arguments ------------------------------------------------------------


def _make_sparse(rng: random.Random) -> Args:
    g = _gen(rng)
    batch, s_q, h_q, topk, blocks = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([16, 32]), rng.choice([8, 64]), rng.choice([1, 3])
    cache = torch.randn(blocks, 64, 1, 576, generator=g).to(torch.bfloat16)
    indices = torch.randint(-1, blocks * 64, (batch, s_q, topk), generator=g, dtype=torch.int32)
    return {
        "q": torch.randn(batch, s_q, h_q, 576, generator=g).to(torch.bfloat16), "k_cache": quantize_mla_kv_cache_reference(cache), "fp8": True,
        "indices": indices, "attn_sink": torch.randn(h_q, generator=g) if rng.random() < 0.5 else None,
        "topk_length": torch.randint(0, topk + 1, (batch,), generator=g, dtype=torch.int32) if rng.random() < 0.5 else None, "causal": False,
    }


def _call_sparse(a: Args) -> Any:
    return hal.flash_mla_with_kvcache(
        a["q"], a["k_cache"], None, None, 512, hal.get_mla_metadata()[0], None, causal=a["causal"], is_fp8_kvcache=a["fp8"],
        indices=a["indices"], attn_sink=a["attn_sink"], topk_length=a["topk_length"],
    )


def _judge_sparse(args: Args, result: Any) -> str | None:
    keys = oracles.fp8_cache_oracle(args["k_cache"]) if args["fp8"] else args["k_cache"].double().reshape(-1, 576)
    want_out, want_lse = oracles.sparse_decode_oracle(args["q"], keys, args["indices"], args["topk_length"], args["attn_sink"], 576**-0.5)
    out, lse = result
    return _compare("mla_decode_v2", "out", out.float(), want_out.float()) or _compare("mla_decode_v2", "lse", lse, want_lse.float())


def _fp8_latent(value: int) -> Callable[[Args, random.Random], Args]:
    """A raw byte written into the first named key's latent (0x7f: an e4m3 NaN)."""
    def apply(a: Args, r: random.Random) -> Args:
        named = a["indices"][a["indices"] >= 0]
        if named.numel() == 0:
            return a
        cache = a["k_cache"].clone()
        cache.view(torch.uint8).view(-1, 656)[int(named[0]), 7] = value
        return _replace(a, k_cache=cache)

    return apply


# Mutations both sparse decode variants (the V3.2 cache and MODEL1's) make.
_EVERY_INDEX_UNUSED = Mutation("every index -1", lambda a, r: _replace(a, indices=torch.full_like(a["indices"], -1)), True)
_INFINITE_SINKS = Mutation("+inf and -inf sinks", lambda a, r: _replace(a, attn_sink=torch.tensor([math.inf, -math.inf] + [0.5] * (a["q"].shape[2] - 2))), True)
_NAN_IN_Q = Mutation("NaN in q", lambda a, r: _replace(a, q=_poke(a["q"], math.nan, r)), True)
_CAUSAL_WITH_INDICES = Mutation("causal with indices", lambda a, r: _replace(a, causal=True, q=a["q"] if a["q"].shape[1] > 1 else torch.cat([a["q"], a["q"]], 1), indices=a["indices"] if a["indices"].shape[1] > 1 else torch.cat([a["indices"], a["indices"]], 1)), False)


SPARSE_DECODE = Operator(
    "mla_decode_v2",
    _make_sparse,
    _call_sparse,
    _judge_sparse,
    (
        Mutation("none", lambda a, r: a, True),
        _EVERY_INDEX_UNUSED,
        Mutation("bf16 cache", lambda a, r: _replace(a, k_cache=torch.randn(a["k_cache"].shape[0], 64, 1, 576).to(torch.bfloat16), fp8=False), True),
        _INFINITE_SINKS,
        Mutation("NaN code in a named key", _fp8_latent(0x7F), True),
        _NAN_IN_Q,
        Mutation("topk_length 0", lambda a, r: _replace(a, topk_length=torch.zeros(a["q"].shape[0], dtype=torch.int32)), True),
        _CAUSAL_WITH_INDICES,
        Mutation("index past the cache", lambda a, r: _replace(a, indices=a["indices"] + a["k_cache"].shape[0] * 64 + 1), False),
        Mutation("index -2", lambda a, r: _replace(a, indices=torch.full_like(a["indices"], -2)), False),
        Mutation("indices int64", lambda a, r: _replace(a, indices=a["indices"].long()), False),
        Mutation("topk_length past topk", lambda a, r: _replace(a, topk_length=torch.full((a["q"].shape[0],), a["indices"].shape[2] + 1, dtype=torch.int32)), False),
        Mutation("sink of another head count", lambda a, r: _replace(a, attn_sink=torch.zeros(a["q"].shape[2] + 1)), False),
        Mutation("fp8 cache without the flag", lambda a, r: _replace(a, fp8=False), False),
        Mutation("cache of 655 bytes per token", lambda a, r: _replace(a, k_cache=a["k_cache"][..., :655]), False),
    ),
)


def _make_model1(rng: random.Random) -> Args:
    """Sparse decode with FlashMLA's d_qk 512: q 512 wide over the MODEL1 FP8 cache (odd pages)."""
    g = _gen(rng)
    batch, s_q, h_q, topk, blocks, page = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([16, 32]), rng.choice([8, 64]), rng.choice([1, 3]), rng.choice([2, 61, 64])
    cache = hal.quantize_model1_kv_cache(torch.randn(blocks, page, 1, 512, generator=g).to(torch.bfloat16))
    return {
        "q": torch.randn(batch, s_q, h_q, 512, generator=g).to(torch.bfloat16), "k_cache": cache, "fp8": True,
        "indices": torch.randint(-1, blocks * page, (batch, s_q, topk), generator=g, dtype=torch.int32),
        "attn_sink": torch.randn(h_q, generator=g) if rng.random() < 0.5 else None,
        "topk_length": torch.randint(0, topk + 1, (batch,), generator=g, dtype=torch.int32) if rng.random() < 0.5 else None, "causal": False,
    }


def _judge_model1(args: Args, result: Any) -> str | None:
    keys = oracles.model1_cache_oracle(args["k_cache"])
    want_out, want_lse = oracles.sparse_decode_oracle(args["q"], keys, args["indices"], args["topk_length"], args["attn_sink"], 512**-0.5)
    out, lse = result
    return _compare("mla_decode_v2", "out", out.float(), want_out.float()) or _compare("mla_decode_v2", "lse", lse, want_lse.float())


def _model1_nan_code(a: Args, r: random.Random) -> Args:
    """An e4m3 NaN written into the first named key's NoPE values."""
    named = a["indices"][a["indices"] >= 0]
    if named.numel() == 0:
        return a
    cache = hal.quantize_model1_kv_cache(hal.dequantize_model1_kv_cache(a["k_cache"]).to(torch.bfloat16))  # a fresh copy of the same values
    page = cache.shape[1]
    block, slot = divmod(int(named[0]), page)
    model1_pages(cache)[block, slot * 576 + 3] = 0x7F
    return _replace(a, k_cache=cache)


SPARSE_DECODE_MODEL1 = Operator(
    "mla_decode_v2.model1",
    _make_model1,
    _call_sparse,
    _judge_model1,
    (
        Mutation("none", lambda a, r: a, True),
        _EVERY_INDEX_UNUSED,
        _INFINITE_SINKS,
        Mutation("NaN code in a named key", _model1_nan_code, True),
        _NAN_IN_Q,
        Mutation("index past the cache", lambda a, r: _replace(a, indices=a["indices"] + a["k_cache"].shape[0] * a["k_cache"].shape[1] + 1), False),
        Mutation("q 576 wide over the MODEL1 cache", lambda a, r: _replace(a, q=torch.cat([a["q"], a["q"][..., :64]], -1)), False),
        Mutation("MODEL1 cache without the fp8 flag", lambda a, r: _replace(a, fp8=False), False),
        Mutation("tokens 576 bytes apart in the view", lambda a, r: _replace(a, k_cache=a["k_cache"].as_strided(a["k_cache"].shape, (a["k_cache"].stride(0), 576, 576, 1))), False),
        _CAUSAL_WITH_INDICES,
    ),
    operator="mla_decode_v2",
)


def _make_prefill(rng: random.Random) -> Args:
    g = _gen(rng)
    s_q, s_kv, h_kv, topk = rng.choice([1, 5]), rng.choice([8, 70]), rng.choice([1, 2]), rng.choice([4, 16])
    h_q = h_kv * rng.choice([8, 16])
    d_qk = rng.choice([576, 576, 512])
    return {
        "q": torch.randn(s_q, h_q, d_qk, generator=g).to(torch.bfloat16), "kv": torch.randn(s_kv, h_kv, d_qk, generator=g).to(torch.bfloat16),
        "indices": torch.randint(-1, s_kv + 2, (s_q, h_kv, topk), generator=g, dtype=torch.int32), "sm_scale": d_qk**-0.5,
        "attn_sink": torch.randn(h_q, generator=g) if rng.random() < 0.5 else None,
        "topk_length": torch.randint(0, topk + 1, (s_q,), generator=g, dtype=torch.int32) if rng.random() < 0.5 else None,
    }


def _judge_prefill(args: Args, result: Any) -> str | None:
    want = oracles.sparse_prefill_oracle(args["q"], args["kv"], args["indices"], args["sm_scale"], args["attn_sink"], args["topk_length"])
    out, max_logits, lse = result
    return (_compare("mla_sparse_prefill", "out", out.float(), want[0].float()) or _compare("mla_sparse_prefill", "max_logits", max_logits, want[1].float())
            or _compare("mla_sparse_prefill", "lse", lse, want[2].float()))


SPARSE_PREFILL = Operator(
    "mla_sparse_prefill",
    _make_prefill,
    lambda a: hal.flash_mla_sparse_fwd(a["q"], a["kv"], a["indices"], a["sm_scale"], attn_sink=a["attn_sink"], topk_length=a["topk_length"]),
    _judge_prefill,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("every index out of range", lambda a, r: _replace(a, indices=torch.full_like(a["indices"], a["kv"].shape[0])), True),
        Mutation("NaN in a key", lambda a, r: _replace(a, kv=_poke(a["kv"], math.nan, r)), True),
        Mutation("sm_scale 0", lambda a, r: _replace(a, sm_scale=0.0), False),
        Mutation("q float32", lambda a, r: _replace(a, q=a["q"].float()), False),
        Mutation("h_q not a multiple of h_kv", lambda a, r: _replace(a, kv=torch.cat([a["kv"]] * 3, 1), indices=torch.cat([a["indices"]] * 3, 1)), False),
        Mutation("indices of another h_kv", lambda a, r: _replace(a, indices=torch.cat([a["indices"], a["indices"]], 1)), False),
        Mutation("d_qk 8 short", lambda a, r: _replace(a, q=a["q"][..., :-8].contiguous(), kv=a["kv"][..., :-8].contiguous()), False),
        Mutation("kv narrower than q", lambda a, r: _replace(a, kv=a["kv"][..., :-64].contiguous() if a["kv"].shape[-1] == 576 else torch.cat([a["kv"], a["kv"][..., :64]], -1)), False),
    ),
)


# --- the FP8 cache writer and the indexer (DeepSeek-V3.2) ---------------------------------------


def _make_quantize(rng: random.Random) -> Args:
    g = _gen(rng)
    blocks, page = rng.choice([0, 1, 3]), rng.choice([1, 16, 64])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    x = torch.randn(blocks, page, 1, 576, generator=g) * torch.exp2(torch.randint(-16, 8, (blocks, page, 1, 1), generator=g).float())
    return {"x": x.to(dtype)}


def _judge_quantize(args: Args, result: Any) -> str | None:
    from hal.conformance.cases_mla_v2 import _canonical_nans

    want = oracles.quantize_cache_oracle(args["x"])
    return _exact("records", _canonical_nans(result), _canonical_nans(want.view(torch.float8_e4m3fn)))


QUANTIZE_CACHE = Operator(
    "quantize_mla_kv_cache",
    _make_quantize,
    lambda a: hal.quantize_mla_kv_cache(a["x"]),
    _judge_quantize,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("tiles under the scale clamp", lambda a, r: _replace(a, x=a["x"] * 1e-6), True),
        Mutation("NaN", lambda a, r: _replace(a, x=_poke(a["x"], math.nan, r)), True),
        Mutation("strided tokens", lambda a, r: _replace(a, x=torch.cat([a["x"], a["x"]], 1)[:, ::2]), True),
        Mutation("amax exactly 448 x a power of two", lambda a, r: _replace(a, x=_poke(a["x"].clamp(-1, 1), 3.5, r)), True),
        Mutation("d 512", lambda a, r: _replace(a, x=a["x"][..., :512]), False),
        Mutation("h_kv 2", lambda a, r: _replace(a, x=torch.cat([a["x"], a["x"]], 2)), False),
        Mutation("float64", lambda a, r: _replace(a, x=a["x"].double()), False),
    ),
)


def _make_logits(rng: random.Random) -> Args:
    g = _gen(rng)
    m, n, h, d = rng.choice([1, 5, 16]), rng.choice([1, 33, 96]), rng.choice([1, 4, 16]), rng.choice([32, 64, 128])
    keys, scales = hal.quantize_indexer_keys(torch.randn(n, d, generator=g))
    a = torch.randint(0, n + 1, (m,), generator=g, dtype=torch.int32)
    b = torch.randint(0, n + 1, (m,), generator=g, dtype=torch.int32)
    return {"q": torch.randn(m, h, d, generator=g).to(FP8), "keys": keys, "scales": scales, "weights": torch.randn(m, h, generator=g),
            "start": torch.minimum(a, b), "end": torch.maximum(a, b), "max_seqlen_k": 0, "dtype": torch.float32}


def _call_logits(a: Args) -> Any:
    return hal.fp8_fp4_mqa_logits(a["q"], (a["keys"], a["scales"]), a["weights"], a["start"], a["end"], clean_logits=a["max_seqlen_k"] == 0,
                                  max_seqlen_k=a["max_seqlen_k"], logits_dtype=a["dtype"])


def _judge_logits(args: Args, result: Any) -> str | None:
    inputs = (args["q"], args["keys"], args["scales"], args["weights"], args["start"], args["end"], args["max_seqlen_k"])
    want = oracles.mqa_logits_oracle(*inputs)
    if result.dtype != args["dtype"]:
        return f"dtype {result.dtype}, expected {args['dtype']}"
    got = result.double()
    if args["max_seqlen_k"]:
        got = torch.where(torch.isneginf(want), want, got)
    heads, dim = args["q"].shape[1:]
    got = within_accumulation(got, want, oracles.mqa_logits_oracle(*inputs, magnitude=True), dim + heads + 3, args["dtype"])
    return _compare("mqa_logits", "logits_bf16" if args["dtype"] == torch.bfloat16 else "logits", got, want)


MQA_LOGITS = Operator(
    "mqa_logits",
    _make_logits,
    _call_logits,
    _judge_logits,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("bf16 logits", lambda a, r: _replace(a, dtype=torch.bfloat16), True),
        Mutation("compressed", lambda a, r: _replace(a, max_seqlen_k=max(int((a["end"] - a["start"]).max()), 1)), True),
        Mutation("every row empty", lambda a, r: _replace(a, end=a["start"].clone()), True),
        Mutation("NaN key", lambda a, r: _replace(a, keys=_poke(a["keys"].view(torch.uint8), 0x7F, r).view(FP8)), True),
        Mutation("inf weight", lambda a, r: _replace(a, weights=_poke(a["weights"], math.inf, r)), True),
        Mutation("end past the keys", lambda a, r: _replace(a, end=a["end"] + a["keys"].shape[0] + 1), False),
        Mutation("negative start", lambda a, r: _replace(a, start=a["start"] - 1 - a["end"]), False),
        Mutation("q bf16", lambda a, r: _replace(a, q=a["q"].to(torch.bfloat16)), False),
        Mutation("q e5m2", lambda a, r: _replace(a, q=a["q"].to(torch.float8_e5m2)), False),
        Mutation("scales of another length", lambda a, r: _replace(a, scales=torch.cat([a["scales"], a["scales"]])), False),
        Mutation("head dim 48", lambda a, r: _replace(a, q=torch.zeros(*a["q"].shape[:2], 48).to(FP8), keys=torch.zeros(a["keys"].shape[0], 48).to(FP8)), False),
        Mutation("start int64", lambda a, r: _replace(a, start=a["start"].long()), False),
        Mutation("compressed and clean", lambda a, r: _replace(a, max_seqlen_k=-1), False),
    ),
)


def _make_paged(rng: random.Random) -> Args:
    g = _gen(rng)
    batch, next_n, h, d, block_kv = rng.choice([1, 3]), rng.choice([1, 2, 4]), rng.choice([4, 16]), rng.choice([32, 128]), rng.choice([16, 64])
    lens = torch.randint(0, 150, (batch,), generator=g, dtype=torch.int32)
    two_d = rng.random() < 0.6
    context = ((lens[:, None] + 1) * torch.rand(batch, next_n, generator=g)).to(torch.int32) if two_d else lens
    if two_d:
        context[:, -1] = lens
    pages = int(-(-int(lens.max()) // block_kv)) + 1
    blocks = batch * pages
    values, scales = hal.quantize_indexer_keys(torch.randn(blocks, block_kv, d, generator=g))
    return {"q": torch.randn(batch, next_n, h, d, generator=g).to(FP8), "cache": hal.pack_paged_indexer_cache(values, scales),
            "weights": torch.randn(batch * next_n, h, generator=g), "context_lens": context.contiguous(),
            "table": torch.randperm(blocks, generator=g).to(torch.int32).view(batch, pages), "width": int(lens.max()) + rng.choice([0, 7]),
            "dtype": torch.float32}


def _call_paged(a: Args) -> Any:
    lens = a["context_lens"]
    meta = hal.get_paged_mqa_logits_metadata(lens if lens.dim() == 2 else lens[:, None], a["cache"].shape[1], 4)
    return hal.fp8_fp4_paged_mqa_logits(a["q"], a["cache"], a["weights"], lens, a["table"], meta, a["width"], clean_logits=True, logits_dtype=a["dtype"])


def _judge_paged(args: Args, result: Any) -> str | None:
    inputs = (args["q"], args["cache"], args["weights"], args["context_lens"], args["table"], args["width"])
    want = oracles.paged_mqa_logits_oracle(*inputs)
    if result.dtype != args["dtype"]:
        return f"dtype {result.dtype}, expected {args['dtype']}"
    heads, dim = args["q"].shape[2:]
    got = within_accumulation(result.double(), want, oracles.paged_mqa_logits_oracle(*inputs, magnitude=True), dim + heads + 3, args["dtype"])
    return _compare("paged_mqa_logits", "logits_bf16" if args["dtype"] == torch.bfloat16 else "logits", got, want)


def _context_past_width(a: Args, r: random.Random) -> Args:
    """A context one longer than max_context_len (when every context was empty, one of length 1
    and a width of 0: a width of max - 1 alone would then be a valid call)."""
    lens = a["context_lens"].clone()
    if int(lens.max()) == 0:
        lens.view(-1)[0] = 1
    return _replace(a, context_lens=lens, width=int(lens.max()) - 1)


def _table_past_cache(a: Args, r: random.Random) -> Args:
    """Every block id past the cache, and a page that is read (when every context was empty, the
    first sequence's rows get length 1: entries no row reads may hold anything)."""
    lens = a["context_lens"].clone()
    width = a["width"]
    if int(lens.max()) == 0:
        lens[0] = 1
        width = max(width, 1)
    return _replace(a, table=a["table"] + a["cache"].shape[0], context_lens=lens, width=width)


PAGED_MQA_LOGITS = Operator(
    "paged_mqa_logits",
    _make_paged,
    _call_paged,
    _judge_paged,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("bf16 logits", lambda a, r: _replace(a, dtype=torch.bfloat16), True),
        Mutation("every context empty", lambda a, r: _replace(a, context_lens=torch.zeros_like(a["context_lens"])), True),
        Mutation("NaN scale in a block", lambda a, r: _replace(a, cache=_nan_scale(a["cache"])), True),
        Mutation("context past max_context_len", _context_past_width, False),
        Mutation("block id past the cache", _table_past_cache, False),
        Mutation("cache of D + 3 bytes", lambda a, r: _replace(a, cache=a["cache"][..., :-1]), False),
        Mutation("q float32", lambda a, r: _replace(a, q=a["q"].float()), False),
        Mutation("weights of another row count", lambda a, r: _replace(a, weights=torch.cat([a["weights"], a["weights"]])), False),
        Mutation("context_lens int64", lambda a, r: _replace(a, context_lens=a["context_lens"].long()), False),
    ),
)


def _nan_scale(cache: torch.Tensor) -> torch.Tensor:
    """Every scale of the first block NaN (keys a row reads then give NaN logits)."""
    out = cache.clone()
    block_kv, width = cache.shape[1], cache.shape[-1]
    raw = out.view(torch.uint8).view(cache.shape[0], -1)
    raw[0, block_kv * (width - 4) :] = torch.full((block_kv,), math.nan).view(torch.uint8)
    return out


# --- DeepGEMM's current names: fp8_gemm_{nt,nn,tn,tt}, BF16 GEMMs --------------------------------


def _make_v2(rng: random.Random) -> Args:
    from hal.ops import ue8m0 as u

    g = _gen(rng)
    m, n, k = rng.choice([1, 7, 40]), rng.choice([64, 130]), rng.choice([128, 256, 320])
    per_token = rng.random() < 0.5
    a = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, k, generator=g).to(torch.bfloat16)
    lhs = u.per_token_cast_to_fp8(torch.nn.functional.pad(a, (0, -k % 128)), use_ue8m0=rng.random() < 0.5)
    rhs = (u.per_token_cast_to_fp8 if per_token else u.per_block_cast_to_fp8)(torch.nn.functional.pad(b, (0, -k % 128)), use_ue8m0=False)
    fp32 = rng.random() < 0.5
    d = torch.empty(m, n, dtype=torch.float32 if fp32 else torch.bfloat16)
    c = (torch.randn(m, n, generator=g) * 8).to(d.dtype) if rng.random() < 0.5 else None
    return {"lhs": (lhs[0][:, :k], lhs[1]), "rhs": (rhs[0][:, :k].contiguous(), rhs[1]), "d": d, "c": c, "layout": rng.choice(["nt", "nn", "tn", "tt"]),
            "recipe": (1, 1, 128) if per_token else None}


def _call_v2(a: Args) -> Any:
    (av, asf), (bv, bsf) = a["lhs"], a["rhs"]
    if a["layout"][0] == "t":
        av, asf = av.t().contiguous(), asf.t()
    if a["layout"][1] == "n":
        bv, bsf = bv.t().contiguous(), bsf.t()
    getattr(hal, f"fp8_gemm_{a['layout']}")((av, asf), (bv, bsf), a["d"], c=a["c"], recipe=a["recipe"])
    return a["d"]


def _judge_v2(args: Args, result: Any) -> str | None:
    from hal.conformance.cases_gemm import _scales_f32

    sa = _scales_f32(args["lhs"][1], args["lhs"][0].shape[1])
    want = oracles.gemm_oracle(args["lhs"][0], sa, args["rhs"][0], args["rhs"][1])
    c = args.get("c_before", args["c"])  # d given as c: c's values before the call
    if c is not None:
        want = want + c.double()
    return _compare("gemm_fp8_nt", "out_fp32" if result.dtype == torch.float32 else "out", result.float(), want)


def _packed(a: Args, r: random.Random) -> Args:
    from hal.ops.ue8m0 import ceil_to_ue8m0, pack_ue8m0_to_int

    scales = ceil_to_ue8m0(a["lhs"][1])
    values = (a["lhs"][0].float() * 0).to(FP8)  # zeros: any scale gives zero products, so the packed scales must only decode right
    padded = torch.nn.functional.pad(scales, (0, -scales.shape[1] % 4), value=1.0)
    return _replace(a, lhs=(values, pack_ue8m0_to_int(padded)))


def _accumulate_in_place(a: Args, r: random.Random) -> Args:
    c = a["c"] if a["c"] is not None else torch.randn(a["d"].shape).to(a["d"].dtype)
    d = c.clone()
    return _replace(a, d=d, c=d, c_before=c.clone())


FP8_V2 = Operator(
    "gemm_fp8_nt.v2",
    _make_v2,
    _call_v2,
    _judge_v2,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("packed UE8M0 LHS scales", _packed, True),
        Mutation("d given as c (accumulate in place)", _accumulate_in_place, True),
        Mutation("NaN scale", lambda a, r: _pair(a, "lhs", 1, _poke(a["lhs"][1], math.nan, r)), True),
        Mutation("c of another dtype", lambda a, r: _replace(a, c=torch.zeros(a["d"].shape, dtype=torch.float16)), False),
        Mutation("d float16", lambda a, r: _replace(a, d=torch.empty(a["d"].shape, dtype=torch.float16)), False),
        Mutation("recipe (1, 128, 64)", lambda a, r: _replace(a, recipe=(1, 128, 64)), False),
        Mutation("per-token recipe, block scales", lambda a, r: _replace(a, recipe=(1, 1, 128)) if a["recipe"] is None and a["rhs"][0].shape[0] > 128 else _replace(a, recipe=(2, 2, 2)), False),
        Mutation("RHS K differs", lambda a, r: _pair(a, "rhs", 0, a["rhs"][0][:, :-1]), False),
        Mutation("FP4 LHS", lambda a, r: _pair(a, "lhs", 0, torch.zeros(a["lhs"][0].shape, dtype=torch.int8)), False),
    ),
    operator="gemm_fp8_nt",
)


def _make_grouped_v2(rng: random.Random) -> Args:
    """DeepGEMM's current contiguous grouped GEMM: rows laid out by m_indices or by the psum layout
    (each group's end row; a group starts at the previous end rounded up to 128), B scaled per
    128 x 128 block or per token; the output NaN where nothing may be written."""
    from hal.ops import ue8m0 as u

    g = _gen(rng)
    groups, n, k = rng.choice([1, 3, 4]), rng.choice([64, 130]), rng.choice([128, 256])
    per_token = rng.random() < 0.5
    counts = [rng.choice([0, 1, 100, 128, 200]) for _ in range(groups)]
    ends, ids, start = [], [], 0
    for group, count in enumerate(counts):
        ends.append(start + count)
        aligned = -(-(start + count) // 128) * 128
        ids += [group] * count + [-1] * (aligned - start - count)
        start = aligned
    m = max(start + 128 * rng.choice([0, 1]), 128)  # rows past the last group's end: left alone
    ids += [-1] * (m - len(ids))
    b = torch.randn(groups, n, k, generator=g).to(torch.bfloat16)
    cast = u.per_token_cast_to_fp8 if per_token else u.per_block_cast_to_fp8
    rhs = [cast(b[i], use_ue8m0=False) for i in range(groups)]
    return {
        "lhs": _cast_lhs(m, k, g), "rhs": (torch.stack([x for x, _ in rhs]), torch.stack([s for _, s in rhs])),
        "out": torch.full((m, n), math.nan, dtype=torch.bfloat16), "psum": rng.random() < 0.5,
        "ends": torch.tensor(ends, dtype=torch.int32), "m_indices": torch.tensor(ids, dtype=torch.int32),
        "recipe": (1, 1, 128) if per_token else None, "recipe_a": None,
    }


def _call_grouped_v2(a: Args) -> Any:
    layout = a["ends"] if a["psum"] else a["m_indices"]
    hal.m_grouped_fp8_gemm_nt_contiguous(a["lhs"], a["rhs"], a["out"], layout, recipe=a["recipe"], recipe_a=a["recipe_a"], use_psum_layout=a["psum"])
    return a["out"]


def _rows_of_layout(a: Args) -> torch.Tensor:
    """The group each row is computed with, from the layout's definition: m_indices by whole
    128-row blocks (a block's -1 rows with its group); psum: group g owns [align(end[g-1]),
    align(end[g])), the rows past the last aligned end none (-1)."""
    if not a["psum"]:
        return rows_by_block(a["m_indices"])
    rows = torch.full((a["out"].shape[0],), -1, dtype=torch.int32)
    start = 0
    for group, end in enumerate(a["ends"].tolist()):
        aligned = -(-end // 128) * 128
        rows[start:aligned] = group
        start = max(start, aligned)
    return rows


def _judge_grouped_v2(args: Args, result: Any) -> str | None:
    rows = _rows_of_layout(args)
    want = oracles.grouped_contiguous_oracle(args["lhs"][0], args["lhs"][1], args["rhs"][0], args["rhs"][1], rows)
    computed = rows >= 0
    problem = _compare("m_grouped_gemm_fp8_nt_contiguous", "out", result[computed], want[computed])
    if problem is None and not bool(torch.isnan(result[~computed].float()).all()):
        problem = "rows no group owns were written"
    return problem


def _psum_end(position: int, value: Callable[[Args], int]) -> Callable[[Args, random.Random], Args]:
    """The psum layout with one group's end changed (position -1: the last group)."""
    def apply(a: Args, r: random.Random) -> Args:
        ends = a["ends"].clone()
        ends[position] = value(a)
        return _replace(a, psum=True, ends=ends)

    return apply


GROUPED_V2 = Operator(
    "m_grouped_gemm_fp8_nt_contiguous.v2",
    _make_grouped_v2,
    _call_grouped_v2,
    _judge_grouped_v2,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("psum layout", lambda a, r: _replace(a, psum=True), True),
        Mutation("last end past M", _psum_end(-1, lambda a: a["out"].shape[0] + 1), False),
        Mutation("negative first end", _psum_end(0, lambda a: -1), False),
        Mutation("an end before the previous one", lambda a, r: _psum_end(1, lambda b: int(b["ends"][0]) - 1)(a, r) if a["ends"].numel() > 1 and int(a["ends"][0]) > 0
                 else _psum_end(0, lambda b: -5)(a, r), False),
        Mutation("group id past G", lambda a, r: _replace(a, psum=False, m_indices=torch.where(a["m_indices"] >= 0, a["rhs"][0].shape[0], a["m_indices"]).to(torch.int32))
                 if bool((a["m_indices"] >= 0).any()) else _replace(a, psum=False, m_indices=torch.full_like(a["m_indices"], -2)), False),
        Mutation("M not a multiple of 128", lambda a, r: _replace(a, lhs=(a["lhs"][0][:-1], a["lhs"][1][:-1]), out=a["out"][:-1], m_indices=a["m_indices"][:-1],
                                                                  ends=a["ends"].clamp(max=a["out"].shape[0] - 1)), False),
        Mutation("grouped layout int64", lambda a, r: _replace(a, ends=a["ends"].long(), m_indices=a["m_indices"].long()), False),
        Mutation("per-token recipe, block scales", lambda a, r: _replace(a, recipe=(1, 1, 128)) if a["recipe"] is None else _replace(a, recipe=(1, 128, 128)), False),
        Mutation("recipe_a (1, 64)", lambda a, r: _replace(a, recipe_a=(1, 64)), False),
    ),
    operator="m_grouped_gemm_fp8_nt_contiguous",
)


def _make_masked_v2(rng: random.Random) -> Args:
    """DeepGEMM's current masked grouped GEMM with B scaled per token (recipe (1, 1, 128))."""
    from hal.ops import ue8m0 as u

    g = _gen(rng)
    groups, m_max, n, k = rng.choice([1, 3]), rng.choice([8, 32]), rng.choice([64, 130]), rng.choice([128, 256])
    a = [_cast_lhs(m_max, k, g) for _ in range(groups)]
    b = torch.randn(groups, n, k, generator=g).to(torch.bfloat16)
    rhs = [u.per_token_cast_to_fp8(b[i], use_ue8m0=False) for i in range(groups)]
    return {
        "lhs": (torch.stack([x.contiguous() for x, _ in a]), torch.stack([s for _, s in a])),
        "rhs": (torch.stack([x for x, _ in rhs]), torch.stack([s for _, s in rhs])),
        "out": torch.full((groups, m_max, n), math.nan, dtype=torch.bfloat16),
        "masked_m": torch.tensor([rng.randint(0, m_max) for _ in range(groups)], dtype=torch.int32), "expected_m": rng.choice([1, m_max // 2, 4097]),
    }


MASKED_V2 = Operator(
    "m_grouped_gemm_fp8_nt_masked.v2",
    _make_masked_v2,
    lambda a: hal.m_grouped_fp8_gemm_nt_masked(a["lhs"], a["rhs"], a["out"], a["masked_m"], a["expected_m"], recipe=(1, 1, 128)),
    _judge_masked,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("masked count past M_max", lambda a, r: _replace(a, masked_m=a["masked_m"] + a["out"].shape[1] + 1), False),
        Mutation("negative masked count", _with_index("masked_m", -1), False),
        Mutation("expected_m 0", lambda a, r: _replace(a, expected_m=0), False),
        Mutation("masked_m int64", lambda a, r: _replace(a, masked_m=a["masked_m"].long()), False),
        Mutation("rhs scales per block", lambda a, r: _pair(a, "rhs", 1, a["rhs"][1][:, :1].contiguous()), False),
    ),
    operator="m_grouped_gemm_fp8_nt_masked",
)


def _make_bf16(rng: random.Random) -> Args:
    g = _gen(rng)
    m, n, k = rng.choice([0, 3, 33]), rng.choice([16, 130]), rng.choice([0, 64, 300])
    fp32 = rng.random() < 0.5
    d = torch.empty(m, n, dtype=torch.float32 if fp32 else torch.bfloat16)
    return {"a": torch.randn(m, k, generator=g).to(torch.bfloat16), "b": torch.randn(n, k, generator=g).to(torch.bfloat16), "d": d,
            "c": (torch.randn(m, n, generator=g) * 4).to(d.dtype) if rng.random() < 0.5 else None, "layout": rng.choice(["nt", "nn", "tn", "tt"])}


def _call_bf16(a: Args) -> Any:
    x = a["a"].t().contiguous() if a["layout"][0] == "t" else a["a"]
    y = a["b"].t().contiguous() if a["layout"][1] == "n" else a["b"]
    getattr(hal, f"bf16_gemm_{a['layout']}")(x, y, a["d"], c=a["c"])
    return a["d"]


def _judge_bf16(args: Args, result: Any) -> str | None:
    want = oracles.bf16_gemm_oracle(args["a"], args["b"], args["c"])
    return _compare("gemm_bf16_nt", "out_fp32" if result.dtype == torch.float32 else "out", result.float(), want)


BF16_GEMM = Operator(
    "gemm_bf16_nt",
    _make_bf16,
    _call_bf16,
    _judge_bf16,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("NaN in a", lambda a, r: _replace(a, a=_poke(a["a"], math.nan, r)), True),
        Mutation("inf in b", lambda a, r: _replace(a, b=_poke(a["b"], math.inf, r)), True),
        Mutation("a float32", lambda a, r: _replace(a, a=a["a"].float()), False),
        Mutation("K differs", lambda a, r: _replace(a, b=torch.zeros(a["b"].shape[0], a["b"].shape[1] + 1, dtype=torch.bfloat16)), False),
        Mutation("d of another shape", lambda a, r: _replace(a, d=torch.empty(a["d"].shape[0] + 1, a["d"].shape[1], dtype=a["d"].dtype), c=None), False),
        Mutation("c of another dtype", lambda a, r: _replace(a, c=torch.zeros(a["d"].shape, dtype=torch.float16)), False),
    ),
)


# --- expert parallelism (local operators) ----------------------------------------------------


def _make_layout(rng: random.Random) -> Args:
    g = _gen(rng)
    ranks = rng.choice([1, 2, 8, 16])
    experts = ranks * rng.choice([1, 4])
    tokens, topk = rng.choice([0, 1, 9, 64]), min(experts, rng.choice([1, 2, 8]))
    topk_idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]) if tokens else torch.zeros(0, topk, dtype=torch.int64)
    if tokens:
        topk_idx[torch.rand(tokens, topk, generator=g) < 0.2] = -1
    return {"topk_idx": topk_idx, "num_experts": experts, "num_ranks": ranks}


def _judge_layout(args: Args, result: Any) -> str | None:
    want = oracles.dispatch_layout_oracle(args["topk_idx"], args["num_experts"], args["num_ranks"])
    return _all_exact(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank"), result, want)


LAYOUT = Operator(
    "ep_dispatch_layout",
    _make_layout,
    lambda a: hal.get_dispatch_layout(a["topk_idx"], a["num_experts"], a["num_ranks"]),
    _judge_layout,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("expert id past E", lambda a, r: _replace(a, topk_idx=torch.cat([a["topk_idx"], torch.full((1, a["topk_idx"].shape[1]), a["num_experts"])])), False),
        Mutation("expert id -2", lambda a, r: _replace(a, topk_idx=torch.cat([a["topk_idx"], torch.full((1, a["topk_idx"].shape[1]), -2)])), False),
        Mutation("topk_idx float", lambda a, r: _replace(a, topk_idx=a["topk_idx"].float()), False),
        Mutation("topk_idx rank 1", lambda a, r: _replace(a, topk_idx=a["topk_idx"].flatten()), False),
        Mutation("experts not a multiple of ranks", lambda a, r: _replace(a, num_experts=4 * max(a["num_ranks"], 2) + 1, num_ranks=max(a["num_ranks"], 2)), False),
        Mutation("2**40 experts", lambda a, r: _replace(a, num_experts=2**40), False),
        Mutation("num_ranks 0", lambda a, r: _replace(a, num_ranks=0), False),
    ),
)


def _make_pack(rng: random.Random) -> Args:
    g = _gen(rng)
    rows, width, buckets, slots = rng.choice([0, 1, 7]), rng.choice([1, 16]), rng.choice([1, 3]), rng.choice([1, 2])
    bucket_idx = torch.stack([torch.randperm(buckets, generator=g)[:slots] for _ in range(rows)]) if rows and slots <= buckets else torch.full((rows, 1), -1, dtype=torch.int64)
    if rows:
        bucket_idx[torch.rand(bucket_idx.shape, generator=g) < 0.3] = -1
    return {"rows": torch.randn(rows, width, generator=g).to(torch.bfloat16), "bucket_idx": bucket_idx, "num_buckets": buckets}


def _judge_pack(args: Args, result: Any) -> str | None:
    want = oracles.pack_oracle(args["rows"], args["bucket_idx"], args["num_buckets"])
    return _all_exact(("packed", "src_idx", "counts"), result, want)


def _rows_dtype(dtype: torch.dtype) -> Callable[[Args, random.Random], Args]:
    return lambda a, r: _replace(a, rows=(a["rows"].float() * 8).to(dtype))


PACK = Operator(
    "ep_pack",
    _make_pack,
    lambda a: hal.ep_pack(a["rows"], a["bucket_idx"], a["num_buckets"]),
    _judge_pack,
    (
        Mutation("none", lambda a, r: a, True),
        *(Mutation(f"rows {d}", _rows_dtype(d), True) for d in (FP8, torch.bool, torch.float64, torch.int8)),
        Mutation("bucket past B", lambda a, r: _replace(a, bucket_idx=torch.full_like(a["bucket_idx"], a["num_buckets"])) if a["bucket_idx"].numel() else a, None),
        Mutation("bucket -2", lambda a, r: _replace(a, bucket_idx=torch.full_like(a["bucket_idx"], -2)) if a["bucket_idx"].numel() else a, None),
        Mutation("bucket_idx int32", lambda a, r: _replace(a, bucket_idx=a["bucket_idx"].int()), False),
        Mutation("num_buckets 0", lambda a, r: _replace(a, num_buckets=0), False),
    ),
)


def _make_unpack(rng: random.Random) -> Args:
    g = _gen(rng)
    rows, buckets, slots = rng.choice([0, 1, 6]), rng.choice([1, 3]), 8
    return {
        "rows": torch.randn(rows, rng.choice([1, 16]), generator=g).to(torch.bfloat16),
        "bucket_of_row": torch.randint(0, buckets, (rows,), generator=g, dtype=torch.int32), "num_buckets": buckets, "num_slots": slots,
    }


def _judge_unpack(args: Args, result: Any) -> str | None:
    want = oracles.unpack_oracle(args["rows"], args["bucket_of_row"], args["num_buckets"], args["num_slots"])
    return _all_exact(("slots", "counts"), result, want)


UNPACK = Operator(
    "ep_unpack",
    _make_unpack,
    lambda a: hal.ep_unpack(a["rows"], a["bucket_of_row"], a["num_buckets"], a["num_slots"]),
    _judge_unpack,
    (
        Mutation("none", lambda a, r: a, True),
        *(Mutation(f"rows {d}", _rows_dtype(d), True) for d in (FP8, torch.float8_e5m2, torch.bool, torch.float64)),
        Mutation("more rows than slots", lambda a, r: _replace(a, num_slots=1, rows=torch.zeros(2, 4), bucket_of_row=torch.zeros(2, dtype=torch.int32)), False),
        Mutation("bucket past B", lambda a, r: _replace(a, bucket_of_row=torch.full_like(a["bucket_of_row"], a["num_buckets"])) if a["rows"].shape[0] else a, None),
        Mutation("bucket_of_row int64", lambda a, r: _replace(a, bucket_of_row=a["bucket_of_row"].long()), False),
    ),
)


def _make_reduce(rng: random.Random) -> Args:
    g = _gen(rng)
    rows, tokens = rng.choice([0, 1, 9]), rng.choice([1, 4])
    return {
        "rows": torch.randn(rows, 16, generator=g).to(rng.choice([torch.bfloat16, torch.float32])),
        "src_idx": torch.randint(0, tokens, (rows,), generator=g, dtype=torch.int32), "num_tokens": tokens,
        "weights": torch.rand(rows, generator=g) if rng.random() < 0.5 else None,
    }


def _split_rows(a: Args, r: random.Random) -> Args:
    """The same rows as segments (contract v2): cut at random places, an empty piece possible."""
    rows = a["rows"]
    cuts = sorted(r.randint(0, rows.shape[0]) for _ in range(r.randint(1, 3)))
    return _replace(a, rows=tuple(rows[x:y] for x, y in zip([0, *cuts], [*cuts, rows.shape[0]])))


def _judge_reduce(args: Args, result: Any) -> str | None:
    rows = args["rows"] if isinstance(args["rows"], torch.Tensor) else torch.cat(args["rows"])
    want = oracles.combine_reduce_oracle(rows, args["src_idx"], args["num_tokens"], args["weights"])
    return _compare("ep_combine_reduce", "out", result.float(), want.float())


REDUCE = Operator(
    "ep_combine_reduce",
    _make_reduce,
    lambda a: hal.ep_combine_reduce(a["rows"], a["src_idx"], a["num_tokens"], a["weights"]),
    _judge_reduce,
    (
        Mutation("none", lambda a, r: a, True),
        Mutation("NaN in a row", lambda a, r: _replace(a, rows=_poke(a["rows"], math.nan, r)), True),
        Mutation("NaN weight", lambda a, r: _replace(a, weights=_poke(a["weights"], math.nan, r)) if a["weights"] is not None else a, True),
        Mutation("source past N", lambda a, r: _replace(a, src_idx=torch.full_like(a["src_idx"], a["num_tokens"])) if a["rows"].shape[0] else a, None),
        Mutation("rows int32", lambda a, r: _replace(a, rows=a["rows"].int()), False),
        Mutation("rows in segments", _split_rows, True),
        Mutation("segments of two dtypes", lambda a, r: _replace(a, rows=(a["rows"], a["rows"][:1].double())), False),
        Mutation("segments of two widths", lambda a, r: _replace(a, rows=(a["rows"], torch.zeros(1, 17, dtype=a["rows"].dtype))), False),
        Mutation("no segments", lambda a, r: _replace(a, rows=()), False),
        Mutation("weights float64", lambda a, r: _replace(a, weights=a["weights"].double()) if a["weights"] is not None else _replace(a, weights=torch.ones(a["rows"].shape[0], dtype=torch.float64)), False),
    ),
)

OPERATORS: dict[str, Operator] = {
    op.name: op for op in (
        DENSE, CONTIGUOUS, MASKED, PER_TOKEN, PER_BLOCK, MLA, SPARSE_DECODE, SPARSE_DECODE_MODEL1, SPARSE_PREFILL, QUANTIZE_CACHE, MQA_LOGITS, PAGED_MQA_LOGITS,
        FP8_V2, GROUPED_V2, MASKED_V2, BF16_GEMM,
        LAYOUT, PACK, UNPACK, REDUCE,
    )
}


# --- running ---------------------------------------------------------------------------------


def _classify(op: Operator, mutation: Mutation, args: Args, backend: str) -> Outcome:
    try:
        with hal.use_backend(backend):
            result = op.call(args)
    except hal.OperatorNotSupportedError as exc:  # a feature the backend says it lacks: reported, not judged
        return Outcome(op.name, mutation.name, mutation.valid, "unsupported", str(exc)[:200])
    except hal.HalError as exc:
        if mutation.valid is True:
            return Outcome(op.name, mutation.name, mutation.valid, "defect", f"refused a valid call: {type(exc).__name__}: {exc}")
        return Outcome(op.name, mutation.name, mutation.valid, "typed error", type(exc).__name__)
    except Exception as exc:  # the defect this suite exists to find
        return Outcome(op.name, mutation.name, mutation.valid, "defect", f"untyped {type(exc).__name__}: {str(exc)[:300]}")
    if mutation.valid is False:
        return Outcome(op.name, mutation.name, mutation.valid, "defect", "accepted an invalid call")
    try:
        problem = op.judge(args, result)
    except Exception as exc:
        problem = f"result could not be judged ({type(exc).__name__}: {exc})"
    return Outcome(op.name, mutation.name, mutation.valid, "defect" if problem else "correct", problem or "")


def run(backend: str, calls: int, seed: int, ops: list[str] | None = None) -> list[Outcome]:
    """``calls`` generated calls on ``backend`` (each mutation of each operator at least once when
    the budget allows, the rest drawn at random), from ``seed``."""
    rng = random.Random(seed)
    implemented = hal.get_backend(backend)
    # Operators the backend does not implement are reported as unsupported by conformance; here they are skipped.
    chosen = [OPERATORS[name] for name in (ops or OPERATORS) if implemented is None or implemented.implements(hal.OPERATORS[OPERATORS[name].hal_operator].hook)]
    plan = [(op, m) for op in chosen for m in op.mutations]
    if calls > len(plan):
        plan += [(op, rng.choice(op.mutations)) for op in (rng.choice(chosen) for _ in range(calls - len(plan)))]
    else:
        plan = rng.sample(plan, calls)
    outcomes = []
    for op, mutation in plan:
        args = op.make(rng)
        try:
            args = mutation.apply(args, rng)
        except Exception as exc:  # a mutation that cannot apply to this draw is the suite's problem, not the backend's
            outcomes.append(Outcome(op.name, mutation.name, mutation.valid, "defect", f"harness: mutation failed: {exc}"))
            continue
        outcomes.append(_classify(op, mutation, args, backend))
    return outcomes


def summarise(outcomes: list[Outcome]) -> Counter:
    return Counter(o.verdict for o in outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.conformance.adversarial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--op", action="append", help="only these operators (repeatable)")
    args = parser.parse_args(argv)
    outcomes = run(args.backend, args.calls, args.seed, args.op)
    counts = summarise(outcomes)
    print(f"{args.backend}: {len(outcomes)} calls, seed {args.seed}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for o in outcomes:
        if o.verdict == "defect":
            print(f"  DEFECT {o.op} [{o.mutation}]: {o.detail}")
    return 1 if counts.get("defect") else 0


if __name__ == "__main__":
    sys.exit(main())
