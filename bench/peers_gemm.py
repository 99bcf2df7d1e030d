"""torch formulations of the FP8 and bf16 GEMMs: the "torch" peer of every GEMM operator.

Inputs are the catalogue's, always in NT form whatever layout the operator is called with:
a [M, K] (or [G, M_max, K] masked), b [N, K] (or [G, N, K] grouped), fp8 e4m3 with float32 or
packed UE8M0 scales (sa per 1x128, sb per 128x128 block or per token), or bf16; the output
``out`` / ``d`` (bf16 or float32), optional ``c`` added in fp32.

What a user without an FP8 GEMM would run: dequantise (values x scales, exact in fp32) and
matmul. B is the weight, static across calls, so the fastest formulations dequantise it once
when prepared, as a deployment would, and only A per call; "per call" dequantises both, what a
drop-in replacement of the kernel does. bf16 matmuls are offered beside fp32 ones: on CPUs with
bf16 dot products (AVX512-BF16, AMX) they run twice as fast, but round their output to bf16,
which DeepGEMM's per-element bound may reject; the check decides, case by case.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hal.bench.formulation import Formulation, Prepared
from hal.conformance.case import Tensors
from hal.ops.fp8_quant import BLOCK

__all__ = ["GEMM_FORMULATIONS"]

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _scales(sf: torch.Tensor, k: int) -> torch.Tensor:
    """float32 scales, ceil(K / 128) columns (packed UE8M0 exponents unpacked)."""
    from hal.ops.gemm_v2 import unpack_ue8m0_scales

    return unpack_ue8m0_scales("bench", "scales", sf, -(-k // BLOCK))


def _per_row(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """fp8 [..., R, K] with scales [..., R, ceil(K/128)] -> float32 [..., R, K]."""
    k = x.shape[-1]
    scales = _scales(sf, k)
    if k % BLOCK == 0:  # a view, no [R, K] scale tensor
        return (x.float().unflatten(-1, (-1, BLOCK)) * scales.unsqueeze(-1)).flatten(-2)
    return x.float() * scales.repeat_interleave(BLOCK, dim=-1)[..., :k]


def _per_block(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """fp8 [..., N, K] with scales [..., ceil(N/128), ceil(K/128)] or per token [..., N, ceil(K/128)] -> float32."""
    n, k = x.shape[-2:]
    scales = _scales(sf, k)
    if scales.shape[-2] == n and n > 1:
        return _per_row(x, scales)
    return x.float() * scales.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :n, :k]


def _lhs(inputs: Tensors, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``rows(index=None)`` -> A[index] in ``dtype``, dequantised when fp8: the per-call part of the work."""
    a, sa = inputs["a"], inputs.get("sa")

    def rows(index: slice | tuple | torch.Tensor | None = None) -> torch.Tensor:
        values = a if index is None else a[index]
        if a.dtype in FP8:
            values = _per_row(values, sa if index is None else sa[index])
        return values.to(dtype)

    return rows


def _rhs_once(inputs: Tensors, dtype: torch.dtype) -> torch.Tensor:
    """B in ``dtype``, dequantised once: [N, K] or [G, N, K]."""
    b = inputs["b"]
    return (_per_block(b, inputs["sb"]) if b.dtype in FP8 else b).to(dtype)


def _target(inputs: Tensors) -> str:
    return "out" if "out" in inputs else "d"


def _finish(product: torch.Tensor, c: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """product (+ c, in fp32) rounded once to the output's dtype."""
    if c is None:
        return product.to(dtype)
    return (product.float() + c.float()).to(dtype)


def _dense(dtype: torch.dtype, weights_once: bool) -> Callable[[Tensors], Prepared]:
    def prepare(inputs: Tensors) -> Prepared:
        key, c = _target(inputs), inputs.get("c")
        out_dtype = inputs[key].dtype
        lhs = _lhs(inputs, dtype)
        weights = _rhs_once(inputs, dtype) if weights_once else None

        def call() -> torch.Tensor:
            rhs = weights if weights is not None else _rhs_once(inputs, dtype)
            return _finish(torch.matmul(lhs(), rhs.T), c, out_dtype)

        return Prepared(call, lambda: {key: call()})

    return prepare


def _segments(m_indices: torch.Tensor, groups: int) -> list[tuple[int, slice | torch.Tensor]]:
    """Rows of each group: a slice when they are contiguous (the layout's usual case), else an index tensor."""
    segments = []
    indices = m_indices.long()
    for g in range(groups):
        rows = (indices == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        start, end = int(rows[0]), int(rows[-1]) + 1
        segments.append((g, slice(start, end) if end - start == rows.numel() else rows))
    return segments


def _grouped_loop(dtype: torch.dtype) -> Callable[[Tensors], Prepared]:
    """One matmul per expert over its rows (contiguous: its m_indices segment; masked: its first masked_m rows)."""

    def prepare(inputs: Tensors) -> Prepared:
        key = _target(inputs)
        result = inputs[key].clone()  # written in place each call, as the operator writes its output
        weights = _rhs_once(inputs, dtype)
        lhs = _lhs(inputs, dtype)
        if "m_indices" in inputs:
            plan = _segments(inputs["m_indices"], weights.shape[0])
        else:
            plan = [(g, (g, slice(0, rows))) for g, rows in enumerate(inputs["masked_m"].tolist()) if rows]

        def call() -> torch.Tensor:
            for g, rows in plan:
                result[rows] = torch.matmul(lhs(rows), weights[g].T).to(result.dtype)
            return result

        return Prepared(call, lambda: {key: call().clone()})

    return prepare


def _masked_bmm(dtype: torch.dtype) -> Callable[[Tensors], Prepared]:
    """One bmm over every expert's M_max slots, valid or not (rows past masked_m are unspecified)."""

    def prepare(inputs: Tensors) -> Prepared:
        key = _target(inputs)
        out_dtype = inputs[key].dtype
        weights = _rhs_once(inputs, dtype)
        lhs = _lhs(inputs, dtype)

        def call() -> torch.Tensor:
            return torch.bmm(lhs(), weights.transpose(1, 2)).to(out_dtype)

        return Prepared(call, lambda: {key: call()})

    return prepare


def _scaled_mm(inputs: Tensors) -> Prepared:
    """torch._scaled_mm with DeepGEMM's block scaling (1x128 LHS, 128x128 RHS), where torch supports it (CUDA)."""
    a, sa, b, sb, key = inputs["a"], inputs["sa"], inputs["b"], inputs["sb"], _target(inputs)
    scale_a, scale_b = sa.contiguous(), sb.t().contiguous()  # [K/128, ceil(N/128)]

    def call() -> torch.Tensor:
        return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)

    return Prepared(call, lambda: {key: call()})


def _bytes(*parts: tuple[int, int]) -> int:
    return sum(elements * size for elements, size in parts)


def _scratch(inputs: Tensors, item: int, weights_once: bool = True) -> int:
    """Dequantised B (kept), dequantised A, the product and its rounded copy, the private output."""
    a, b, out = inputs["a"], inputs["b"], inputs[_target(inputs)]
    return _bytes((b.numel(), item + 4 * (not weights_once)), (a.numel(), 4 + item), (out.numel(), 4 + 4 + out.element_size()))


def _family(layout: str, fp8: bool) -> tuple[Formulation, ...]:
    """The formulations of one GEMM layout (``dense``, ``contiguous``, ``masked``) for fp8 or bf16 operands."""
    f32, bf16 = torch.float32, torch.bfloat16
    once = "dequantised once" if fp8 else "widened once"
    if layout == "dense":
        dense = (
            Formulation(f"fp32 matmul, B {once}", _dense(f32, True), lambda i: _scratch(i, 4)),
            Formulation("bf16 matmul" + (", B dequantised once" if fp8 else ""), _dense(bf16, True), lambda i: _scratch(i, 2)),
        )
        if not fp8:
            return dense
        return dense + (
            Formulation("fp32 matmul, A and B dequantised per call", _dense(f32, False), lambda i: _scratch(i, 4, False)),
            Formulation("torch._scaled_mm (blockwise scales)", _scaled_mm, lambda i: _scratch(i, 0), devices=("cuda",)),
        )
    formulations = (
        Formulation(f"per-expert fp32 matmul, weights {once}", _grouped_loop(f32), lambda i: _scratch(i, 4)),
        Formulation("per-expert bf16 matmul" + (", weights dequantised once" if fp8 else ""), _grouped_loop(bf16), lambda i: _scratch(i, 2)),
    )
    if layout == "masked":
        formulations += (
            Formulation(f"batched fp32 bmm over all slots, weights {once}", _masked_bmm(f32), lambda i: _scratch(i, 4)),
            Formulation("batched bf16 bmm over all slots" + (", weights dequantised once" if fp8 else ""), _masked_bmm(bf16), lambda i: _scratch(i, 2)),
        )
    return formulations


GEMM_FORMULATIONS: dict[str, tuple[Formulation, ...]] = {
    "gemm_fp8_nt": _family("dense", fp8=True),
    "gemm_bf16_nt": _family("dense", fp8=False),
    "m_grouped_gemm_fp8_nt_contiguous": _family("contiguous", fp8=True),
    "m_grouped_gemm_bf16_nt_contiguous": _family("contiguous", fp8=False),
    "m_grouped_gemm_fp8_nt_masked": _family("masked", fp8=True),
    "m_grouped_gemm_bf16_nt_masked": _family("masked", fp8=False),
}
