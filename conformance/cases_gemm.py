"""Conformance cases for the FP8 GEMMs and the FP8 casts (DeepGEMM semantics).

Operands are quantised by the reference casts from bf16 data whose magnitude varies by orders
of magnitude from one 128-channel slice (LHS) or 128x128 block (RHS) to the next, so a backend
that applies a scale to the wrong slice is far off, not within rounding. In-place outputs are
filled with NaN before the run: unwritten elements fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import hal
from hal.conformance.case import Case, Family, Measurement, Tensors, judge
from hal.ops.fp8_quant import BLOCK, dequantize_per_block, dequantize_per_token, per_block_cast_reference, per_token_cast_reference
from hal.ops.gemm import rows_by_block
from hal.ops.gemm_reference import gemm_fp8_nt_reference, m_grouped_contiguous_reference, m_grouped_masked_reference

__all__ = ["gemm_cases", "cast_cases", "gemm_v2_cases", "bf16_gemm_cases"]

# (N, K) of the projections DeepGEMM benchmarks for DeepSeek-V3.
DEEPSEEK_V3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _ranged(rows: int, cols: int, generator: torch.Generator, row_block: int) -> torch.Tensor:
    """N(0, 1) data scaled by a log-normal factor per (row_block x 128) tile, as bf16."""
    tiles = torch.exp(torch.randn(math.ceil(rows / row_block), math.ceil(cols / BLOCK), generator=generator) * 2.0)
    factor = tiles.repeat_interleave(row_block, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (torch.randn(rows, cols, generator=generator) * factor).to(torch.bfloat16)


def _padded_k(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    return torch.nn.functional.pad(x, (0, math.ceil(k / BLOCK) * BLOCK - k))


def _lhs(m: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cast; with K not a multiple of 128, as DeepGEMM's own test casts: pad K with
    zeros, cast, and hand on the row-strided [:, :K] view with ceil(K / 128) scale columns."""
    values, scales = per_token_cast_reference(_padded_k(_ranged(m, k, generator, row_block=1)))
    return values[:, :k], scales


def _rhs(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values, scales = per_block_cast_reference(_padded_k(_ranged(n, k, generator, row_block=BLOCK)))
    return values[:, :k].contiguous(), scales


def _tma_aligned(scales: torch.Tensor) -> torch.Tensor:
    """The same values in DeepGEMM's column-major layout with M padded to a multiple of 4."""
    m, cols = scales.shape
    storage = torch.empty(cols, math.ceil(m / 4) * 4, dtype=scales.dtype)
    storage[:, :m] = scales.t()
    return storage[:, :m].t()


def _poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=torch.bfloat16)


class DenseGemmFamily(Family):
    op = "gemm_fp8_nt"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        m, n, k = params["m"], params["n"], params["k"]
        a, sa = _lhs(m, k, generator)
        if params.get("tma_scales"):
            sa = _tma_aligned(sa)
        b, sb = _rhs(n, k, generator)
        return {"a": a, "sa": sa, "b": b, "sb": sb, "out": _poisoned(m, n)}

    def run(self, inputs: Tensors) -> Tensors:
        hal.gemm_fp8_fp8_bf16_nt((inputs["a"], inputs["sa"]), (inputs["b"], inputs["sb"]), inputs["out"])
        return {"out": inputs["out"]}

    def expect(self, inputs: Tensors) -> Tensors:
        out = _unrounded(inputs["out"])
        gemm_fp8_nt_reference(inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], out)
        return {"out": out}


def _unrounded(out: torch.Tensor) -> torch.Tensor:
    """The reference's fp32 result before its final bf16 rounding, poisoned like ``out``: the
    per-element check then allows half a bf16 ulp (the rounding every correct kernel does last)
    plus accumulation slack, so an output off by one bf16 unit fails."""
    return torch.full(out.shape, math.nan, dtype=torch.float32)


class ContiguousGemmFamily(Family):
    op = "m_grouped_gemm_fp8_nt_contiguous"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        groups, expected_m, n, k = params["groups"], params["expected_m"], params["n"], params["k"]
        sizes = [max(1, int(expected_m * (0.7 + 0.6 * float(torch.rand(1, generator=generator))))) for _ in range(groups)]
        if params.get("empty_group"):
            sizes[groups // 2] = 0
        padded = [math.ceil(s / BLOCK) * BLOCK for s in sizes]
        m_indices = torch.cat(
            [torch.tensor([g] * s + [-1] * (p - s), dtype=torch.int32) for g, (s, p) in enumerate(zip(sizes, padded))]
        )
        m = int(m_indices.numel())
        a, sa = _lhs(m, k, generator)
        b_parts = [_rhs(n, k, generator) for _ in range(groups)]
        b = torch.stack([p[0] for p in b_parts])
        sb = torch.stack([p[1] for p in b_parts])
        return {"a": a, "sa": sa, "b": b, "sb": sb, "out": _poisoned(m, n), "m_indices": m_indices}

    def run(self, inputs: Tensors) -> Tensors:
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
            (inputs["a"], inputs["sa"]), (inputs["b"], inputs["sb"]), inputs["out"], inputs["m_indices"]
        )
        return {"out": inputs["out"]}

    def expect(self, inputs: Tensors) -> Tensors:
        out = _unrounded(inputs["out"])
        m_grouped_contiguous_reference(inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], out, rows_by_block(inputs["m_indices"]))
        return {"out": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        # Every row of a group's aligned block is computed with that group, its -1 padding rows
        # included (DeepGEMM computes whole tiles, and its tests check those rows too).
        rows = rows_by_block(inputs["m_indices"]) >= 0
        return judge(self.op, "out", got["out"][rows], expected["out"][rows])


class MaskedGemmFamily(Family):
    op = "m_grouped_gemm_fp8_nt_masked"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        groups, m_max, n, k = params["groups"], params["m_max"], params["n"], params["k"]
        masked = torch.randint(0, m_max + 1, (groups,), generator=generator, dtype=torch.int32)
        masked[0] = m_max
        if groups > 1:
            masked[-1] = 0
        a_parts = [_lhs(m_max, k, generator) for _ in range(groups)]
        b_parts = [_rhs(n, k, generator) for _ in range(groups)]
        return {
            "a": torch.stack([p[0] for p in a_parts]),
            "sa": torch.stack([p[1] for p in a_parts]),
            "b": torch.stack([p[0] for p in b_parts]),
            "sb": torch.stack([p[1] for p in b_parts]),
            "out": _poisoned(groups, m_max, n),
            "masked_m": masked,
            "expected_m": max(1, params.get("expected_m", m_max // 2)),
        }

    def run(self, inputs: Tensors) -> Tensors:
        hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(
            (inputs["a"], inputs["sa"]), (inputs["b"], inputs["sb"]), inputs["out"], inputs["masked_m"], inputs["expected_m"]
        )
        return {"out": inputs["out"]}

    def expect(self, inputs: Tensors) -> Tensors:
        out = _unrounded(inputs["out"])
        m_grouped_masked_reference(
            inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], out, inputs["masked_m"], inputs["expected_m"]
        )
        return {"out": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        rows = torch.arange(got["out"].shape[1])[None, :] < inputs["masked_m"][:, None].long()
        measurements = judge(self.op, "out", got["out"][rows], expected["out"][rows])
        beyond = got["out"][~rows]
        if not bool(torch.isnan(beyond).all()):
            touched = int((~torch.isnan(beyond)).sum())
            measurements.append(Measurement("out", "untouched", math.inf, 0, False, f"{touched} element(s) beyond masked_m were written"))
        return measurements


class CastFamily(Family):
    """Both casts; ``op`` selects per-token or per-block."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.per_token = op == "per_token_cast_to_fp8"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        rows, cols = params["rows"], params["cols"]
        return {"x": _ranged(rows, cols, generator, row_block=1 if self.per_token else BLOCK).to(params.get("dtype", torch.bfloat16))}

    def run(self, inputs: Tensors) -> Tensors:
        cast = hal.per_token_cast_to_fp8 if self.per_token else hal.per_block_cast_to_fp8
        values, scales = cast(inputs["x"])
        return {"values": values, "scales": scales}

    def expect(self, inputs: Tensors) -> Tensors:
        cast = per_token_cast_reference if self.per_token else per_block_cast_reference
        values, scales = cast(inputs["x"])
        return {"values": values, "scales": scales}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        if got["values"].dtype != torch.float8_e4m3fn:
            return [Measurement("dequantized", "dtype", math.inf, 0, False, f"values dtype {got['values'].dtype}, expected float8_e4m3fn")]
        measurements = judge(self.op, "scales", got["scales"], expected["scales"])
        if tuple(got["values"].shape) != tuple(expected["values"].shape) or not all(m.passed for m in measurements):
            return measurements + judge(self.op, "dequantized", got["values"].float(), expected["values"].float())
        dequantize = dequantize_per_token if self.per_token else dequantize_per_block
        return measurements + judge(self.op, "dequantized", dequantize(got["values"], got["scales"]), dequantize(expected["values"], expected["scales"]))


def gemm_cases() -> list[Case]:
    dense, contiguous, masked = DenseGemmFamily(), ContiguousGemmFamily(), MaskedGemmFamily()
    cases: list[Case] = []
    quick_dense = [(1, 128, 128), (7, 256, 256), (64, 200, 384), (129, 128, 256)]
    for i, (m, n, k) in enumerate(quick_dense):
        cases.append(Case(dense, f"m{m}-n{n}-k{k}", {"m": m, "n": n, "k": k}, quick=True, seed=i))
    cases.append(Case(dense, "m37-n128-k256-tma_scales", {"m": 37, "n": 128, "k": 256, "tma_scales": True}, quick=True, seed=9))
    # K not a multiple of 128 (DeepGEMM's own test: K = 576), with a row-strided A view.
    cases.append(Case(dense, "m16-n128-k576-partialk", {"m": 16, "n": 128, "k": 576}, quick=True, seed=10))
    for i, (n, k) in enumerate(DEEPSEEK_V3_NK):
        for j, m in enumerate((1, 64, 128, 4096, 4095, 2, 4, 8, 16)):  # 1-16: decode batches, read-bound (MoE experts on CPUs)
            cases.append(Case(dense, f"m{m}-n{n}-k{k}", {"m": m, "n": n, "k": k}, quick=False, seed=100 + 10 * i + j))
    cases.append(Case(contiguous, "g4-m100-n128-k256", {"groups": 4, "expected_m": 100, "n": 128, "k": 256}, quick=True, seed=20))
    cases.append(
        Case(contiguous, "g5-m60-n256-k128-emptygroup", {"groups": 5, "expected_m": 60, "n": 256, "k": 128, "empty_group": True}, quick=True, seed=21)
    )
    for i, (g, m, n, k) in enumerate([(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048), (32, 256, 4096, 7168)]):
        cases.append(Case(contiguous, f"g{g}-m{m}-n{n}-k{k}", {"groups": g, "expected_m": m, "n": n, "k": k}, quick=False, seed=200 + i))
    cases.append(Case(masked, "g4-m32-n128-k256", {"groups": 4, "m_max": 32, "n": 128, "k": 256}, quick=True, seed=30))
    cases.append(Case(masked, "g2-m64-n200-k128", {"groups": 2, "m_max": 64, "n": 200, "k": 128}, quick=True, seed=31))
    cases.append(Case(masked, "g2-m16-n128-k200-partialk", {"groups": 2, "m_max": 16, "n": 128, "k": 200}, quick=True, seed=32))
    for i, (g, m) in enumerate([(4, 256), (8, 128), (16, 64), (32, 32)]):
        for j, (n, k) in enumerate([(4096, 7168), (7168, 2048)]):
            cases.append(Case(masked, f"g{g}-m{m}-n{n}-k{k}", {"groups": g, "m_max": m, "n": n, "k": k}, quick=False, seed=300 + 10 * i + j))
    return cases


def cast_cases() -> list[Case]:
    cases: list[Case] = []
    for op in ("per_token_cast_to_fp8", "per_block_cast_to_fp8"):
        family = CastFamily(op)
        shapes = [(5, 256), (130, 384)] if op == "per_token_cast_to_fp8" else [(5, 256), (130, 200), (300, 7)]
        cases += [Case(family, f"{r}x{c}", {"rows": r, "cols": c}, quick=True, seed=40 + i) for i, (r, c) in enumerate(shapes)]
        cases.append(Case(family, "4096x7168", {"rows": 4096, "cols": 7168}, quick=False, seed=49))
    return cases


# --- DeepGEMM's current API: layouts, float32 out with c, per-token RHS, UE8M0 scales; BF16 GEMMs --


def _cast_v2(x: torch.Tensor, per_token: bool, ue8m0: bool, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's current casts (K padded to 128, as its helpers pad); packed UE8M0 when asked."""
    from hal.ops import ue8m0 as u

    k = x.shape[1]
    if per_token:
        values, sf = u.per_token_cast_to_fp8(_padded_k(x), use_ue8m0=ue8m0 or packed, use_packed_ue8m0=packed)
    else:
        values, sf = u.per_block_cast_to_fp8(_padded_k(x), use_ue8m0=ue8m0)
    return values[:, :k], sf


def _scales_f32(sf: torch.Tensor, k: int) -> torch.Tensor:
    """float32 scales for K channels (packed int32 UE8M0 scales unpacked, as the GEMMs unpack them)."""
    from hal.ops.gemm_v2 import unpack_ue8m0_scales

    return unpack_ue8m0_scales("conformance", "scales", sf, -(-k // BLOCK))


class GemmV2Family(Family):
    """``fp8_gemm_{nt,nn,tn,tt}`` with ``c``, bf16 or float32 ``d``, the (1, 128, 128) or (1, 1, 128)
    recipe, float32, UE8M0 or packed UE8M0 scales; judged against the float32 reference."""

    op = "gemm_fp8_nt"

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        m, n, k = params["m"], params["n"], params["k"]
        per_token_b, ue8m0, packed = params.get("recipe") == "token", params.get("ue8m0", False), params.get("packed", False)
        a, sa = _cast_v2(_ranged(m, k, generator, row_block=1), True, ue8m0, packed)
        b, sb = _cast_v2(_ranged(n, k, generator, row_block=1 if per_token_b else BLOCK), per_token_b, ue8m0, packed and per_token_b)
        dtype = torch.float32 if params.get("fp32") else torch.bfloat16
        c = (torch.randn(m, n, generator=generator) * 32).to(dtype) if params.get("accumulate") else None
        return {"a": a, "sa": sa, "b": b, "sb": sb, "c": c, "d": torch.full((m, n), math.nan, dtype=dtype),
                "layout": params.get("layout", "nt"), "per_token_b": per_token_b}

    def run(self, inputs: Tensors) -> Tensors:
        layout = inputs["layout"]
        a, sa, b, sb = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"]
        if layout[0] == "t":  # given transposed, as DeepGEMM's tn/tt callers hold them
            a, sa = a.t().contiguous(), sa.t()
        if layout[1] == "n":
            b, sb = b.t().contiguous(), sb.t()
        d = inputs["d"]
        c = d.copy_(inputs["c"]) if inputs["c"] is not None else None  # accumulate in place, as wgrad does
        getattr(hal, f"fp8_gemm_{layout}")((a, sa), (b, sb), d, c=c, recipe=(1, 1, 128) if inputs["per_token_b"] else None)
        return {"d": d}

    def expect(self, inputs: Tensors) -> Tensors:
        k = inputs["a"].shape[1]
        out = torch.empty(inputs["d"].shape, dtype=torch.float32)
        gemm_fp8_nt_reference(inputs["a"], _scales_f32(inputs["sa"], k), inputs["b"], _scales_f32(inputs["sb"], k), out)
        if inputs["c"] is not None:
            out += inputs["c"].float()
        return {"d": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        output = "out_fp32" if got["d"].dtype == torch.float32 else "out"
        return judge(self.op, output, got["d"].float(), expected["d"])


class GroupedV2Family(Family):
    """The v2 m-grouped names: contiguous with m_indices or the psum layout, masked; per-token RHS."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.masked = op.endswith("masked")

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        groups, n, k = params["groups"], params["n"], params["k"]
        per_token_b = params.get("recipe") == "token"
        parts = [_cast_v2(_ranged(n, k, generator, row_block=1 if per_token_b else BLOCK), per_token_b, params.get("ue8m0", False), False) for _ in range(groups)]
        b, sb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        if self.masked:
            m_max = params["m_max"]
            a_parts = [_cast_v2(_ranged(m_max, k, generator, row_block=1), True, params.get("ue8m0", False), False) for _ in range(groups)]
            masked = torch.randint(0, m_max + 1, (groups,), generator=generator, dtype=torch.int32)
            masked[0] = m_max
            return {"a": torch.stack([p[0] for p in a_parts]), "sa": torch.stack([p[1] for p in a_parts]), "b": b, "sb": sb,
                    "d": _poisoned(groups, m_max, n), "masked_m": masked, "per_token_b": per_token_b}
        sizes = [int(s) for s in torch.randint(1, 2 * params["expected_m"], (groups,), generator=generator)]
        if groups > 2:  # an expert with no rows: the last one
            sizes[-1] = 0
        ends, end, rows = [], 0, []
        for g, size in enumerate(sizes):
            start = math.ceil(end / BLOCK) * BLOCK
            rows += [-1] * (start - len(rows)) + [g] * size
            end = start + size
            ends.append(end)
        rows += [-1] * (math.ceil(len(rows) / BLOCK) * BLOCK - len(rows))
        m_indices = torch.tensor(rows, dtype=torch.int32)
        a, sa = _cast_v2(_ranged(len(rows), k, generator, row_block=1), True, params.get("ue8m0", False), False)
        layout = torch.tensor(ends, dtype=torch.int32) if params.get("psum") else m_indices
        return {"a": a, "sa": sa, "b": b, "sb": sb, "d": _poisoned(len(rows), n), "m_indices": m_indices, "layout": layout,
                "psum": bool(params.get("psum")), "per_token_b": per_token_b}

    def run(self, inputs: Tensors) -> Tensors:
        recipe = (1, 1, 128) if inputs["per_token_b"] else None
        if self.masked:
            hal.m_grouped_fp8_gemm_nt_masked((inputs["a"], inputs["sa"]), (inputs["b"], inputs["sb"]), inputs["d"], inputs["masked_m"], 16, recipe=recipe)
        else:
            hal.m_grouped_fp8_gemm_nt_contiguous((inputs["a"], inputs["sa"]), (inputs["b"], inputs["sb"]), inputs["d"], inputs["layout"],
                                                 recipe=recipe, use_psum_layout=inputs["psum"])
        return {"d": inputs["d"]}

    def expect(self, inputs: Tensors) -> Tensors:
        out = _unrounded(inputs["d"])
        if self.masked:
            m_grouped_masked_reference(inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], out, inputs["masked_m"], 1)
        else:
            m_grouped_contiguous_reference(inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], out, rows_by_block(inputs["m_indices"]))
        return {"d": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        if self.masked:
            rows = torch.arange(got["d"].shape[1])[None, :] < inputs["masked_m"][:, None].long()
        else:  # the psum layout's padding rows too: a group owns its rows up to its aligned end
            rows = rows_by_block(inputs["m_indices"]) >= 0
        return judge(self.op, "out", got["d"][rows], expected["d"][rows])


class Bf16GemmFamily(Family):
    """The BF16 GEMMs: dense (every layout letter, bf16 or float32 d, c), m-grouped contiguous (both
    layouts), masked. Inputs vary in magnitude per tile; outputs start as NaN."""

    def __init__(self, op: str) -> None:
        self.op = op

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        n, k = params["n"], params["k"]
        if self.op == "gemm_bf16_nt":
            m = params["m"]
            dtype = torch.float32 if params.get("fp32") else torch.bfloat16
            c = (torch.randn(m, n, generator=generator) * 32).to(dtype) if params.get("accumulate") else None
            return {"a": _ranged(m, k, generator, 1), "b": _ranged(n, k, generator, 1), "c": c,
                    "d": torch.full((m, n), math.nan, dtype=dtype), "layout": params.get("layout", "nt")}
        groups = params["groups"]
        b = torch.stack([_ranged(n, k, generator, 1) for _ in range(groups)])
        if self.op == "m_grouped_gemm_bf16_nt_masked":
            m_max = params["m_max"]
            masked = torch.randint(0, m_max + 1, (groups,), generator=generator, dtype=torch.int32)
            masked[0] = m_max
            return {"a": torch.stack([_ranged(m_max, k, generator, 1) for _ in range(groups)]), "b": b,
                    "d": _poisoned(groups, m_max, n), "masked_m": masked}
        sizes = [int(s) for s in torch.randint(1, 2 * params["expected_m"], (groups,), generator=generator)]
        rows = []
        for g, size in enumerate(sizes):
            rows += [g] * size + [-1] * (math.ceil(size / BLOCK) * BLOCK - size)
        m_indices = torch.tensor(rows, dtype=torch.int32)
        return {"a": _ranged(len(rows), k, generator, 1), "b": b, "d": _poisoned(len(rows), n), "m_indices": m_indices}

    def run(self, inputs: Tensors) -> Tensors:
        if self.op == "gemm_bf16_nt":
            layout, a, b = inputs["layout"], inputs["a"], inputs["b"]
            a = a.t().contiguous() if layout[0] == "t" else a
            b = b.t().contiguous() if layout[1] == "n" else b
            d = inputs["d"]
            c = d.copy_(inputs["c"]) if inputs["c"] is not None else None
            getattr(hal, f"bf16_gemm_{layout}")(a, b, d, c=c)
        elif self.op == "m_grouped_gemm_bf16_nt_masked":
            hal.m_grouped_bf16_gemm_nt_masked(inputs["a"], inputs["b"], inputs["d"], inputs["masked_m"], 16)
        else:
            hal.m_grouped_bf16_gemm_nt_contiguous(inputs["a"], inputs["b"], inputs["d"], inputs["m_indices"])
        return {"d": inputs["d"]}

    def expect(self, inputs: Tensors) -> Tensors:
        a, b = inputs["a"].float(), inputs["b"].float()
        if self.op == "gemm_bf16_nt":
            out = a @ b.T
            return {"d": out + inputs["c"].float() if inputs["c"] is not None else out}
        out = torch.full(inputs["d"].shape, math.nan)
        if self.op == "m_grouped_gemm_bf16_nt_masked":
            for g, rows in enumerate(inputs["masked_m"].tolist()):
                out[g, :rows] = a[g, :rows] @ b[g].T
        else:
            computed = rows_by_block(inputs["m_indices"])
            for g in range(b.shape[0]):
                rows = computed == g
                out[rows] = a[rows] @ b[g].T
        return {"d": out}

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        d = got["d"]
        if self.op == "m_grouped_gemm_bf16_nt_masked":
            rows = torch.arange(d.shape[1])[None, :] < inputs["masked_m"][:, None].long()
            return judge(self.op, "out", d[rows].float(), expected["d"][rows])
        if self.op == "m_grouped_gemm_bf16_nt_contiguous":
            rows = rows_by_block(inputs["m_indices"]) >= 0
            return judge(self.op, "out", d[rows].float(), expected["d"][rows])
        return judge(self.op, "out_fp32" if d.dtype == torch.float32 else "out", d.float(), expected["d"])


def gemm_v2_cases() -> list[Case]:
    dense = GemmV2Family()
    quick = [
        {"m": 33, "n": 200, "k": 384, "layout": "nt", "fp32": True, "accumulate": True, "recipe": "token"},
        {"m": 64, "n": 256, "k": 256, "layout": "nn", "ue8m0": True},
        {"m": 40, "n": 128, "k": 576, "layout": "tn", "fp32": True, "packed": True, "recipe": "token"},
        {"m": 17, "n": 130, "k": 256, "layout": "tt", "accumulate": True},
    ]
    full = [{"m": 4096, "n": n, "k": k, "layout": "nt", "fp32": True, "accumulate": True, "recipe": "token"} for n, k in DEEPSEEK_V3_NK[:3]]
    full += [{"m": 4096, "n": n, "k": k, "layout": "nn", "ue8m0": True} for n, k in DEEPSEEK_V3_NK[3:]]

    def name(p):
        return "-".join([f"v2{p['layout']}", f"m{p['m']}", f"n{p['n']}", f"k{p['k']}"] + [f for f in ("fp32", "accumulate", "ue8m0", "packed") if p.get(f)]
                        + (["pertoken"] if p.get("recipe") == "token" else []))

    cases = [Case(dense, name(p), p, quick=True, seed=1000 + i) for i, p in enumerate(quick)]
    cases += [Case(dense, name(p), p, quick=False, seed=1100 + i) for i, p in enumerate(full)]
    contiguous, masked = GroupedV2Family("m_grouped_gemm_fp8_nt_contiguous"), GroupedV2Family("m_grouped_gemm_fp8_nt_masked")
    cases.append(Case(contiguous, "v2-g4-m80-n256-k256-psum-pertoken", {"groups": 4, "expected_m": 80, "n": 256, "k": 256, "psum": True, "recipe": "token"}, quick=True, seed=1200))
    cases.append(Case(contiguous, "v2-g3-m60-n128-k384-ue8m0", {"groups": 3, "expected_m": 60, "n": 128, "k": 384, "ue8m0": True}, quick=True, seed=1201))
    cases.append(Case(masked, "v2-g3-m32-n256-k256-pertoken", {"groups": 3, "m_max": 32, "n": 256, "k": 256, "recipe": "token"}, quick=True, seed=1202))
    cases.append(Case(contiguous, "v2-g8-m4096-n4096-k7168-psum", {"groups": 8, "expected_m": 4096, "n": 4096, "k": 7168, "psum": True}, quick=False, seed=1210))
    return cases


def bf16_gemm_cases() -> list[Case]:
    dense = Bf16GemmFamily("gemm_bf16_nt")
    quick = [
        {"m": 37, "n": 200, "k": 256, "layout": "nt"},
        {"m": 64, "n": 128, "k": 200, "layout": "nn", "fp32": True, "accumulate": True},
        {"m": 20, "n": 144, "k": 384, "layout": "tn", "fp32": True},
        {"m": 9, "n": 128, "k": 128, "layout": "tt", "accumulate": True},
    ]
    cases = [Case(dense, f"{p['layout']}-m{p['m']}-n{p['n']}-k{p['k']}" + ("-fp32" if p.get("fp32") else "") + ("-acc" if p.get("accumulate") else ""),
                  p, quick=True, seed=1300 + i) for i, p in enumerate(quick)]
    cases += [Case(dense, f"nt-m{m}-n{n}-k{k}", {"m": m, "n": n, "k": k}, quick=False, seed=1310 + i)
              for i, (m, (n, k)) in enumerate([(4096, nk) for nk in DEEPSEEK_V3_NK[:4]])]
    contiguous = Bf16GemmFamily("m_grouped_gemm_bf16_nt_contiguous")
    cases.append(Case(contiguous, "g4-m90-n256-k256", {"groups": 4, "expected_m": 90, "n": 256, "k": 256}, quick=True, seed=1320))
    cases.append(Case(contiguous, "g8-m2048-n4096-k7168", {"groups": 8, "expected_m": 2048, "n": 4096, "k": 7168}, quick=False, seed=1321))
    masked = Bf16GemmFamily("m_grouped_gemm_bf16_nt_masked")
    cases.append(Case(masked, "g3-m32-n128-k384", {"groups": 3, "m_max": 32, "n": 128, "k": 384}, quick=True, seed=1330))
    cases.append(Case(masked, "g16-m128-n4096-k7168", {"groups": 16, "m_max": 128, "n": 4096, "k": 7168}, quick=False, seed=1331))
    return cases
