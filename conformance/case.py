"""What a conformance case is, and what running one produces.

A :class:`Family` knows one operator: how to build random inputs for a parameter set (on the
CPU, from a seed), how to run the operator through the public ``hal`` API (so argument checks and
selection are exercised exactly as users exercise them), how to compute the expected outputs
with the reference in ``hal.ops``, and how to compare. A :class:`Case` is a family plus one
parameter set; the catalogue is a list of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.conformance.metrics import tolerance

__all__ = ["Family", "Case", "Measurement", "CaseResult", "Tensors", "judge", "copied_to", "on_cpu"]

Tensors = dict[str, Any]


def copied_to(tensors: Tensors, device: str | torch.device) -> Tensors:
    """Fresh copies of every tensor on ``device`` (always copies, so a run cannot alter the
    caller's inputs); other values pass through."""
    return {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def on_cpu(tensors: Tensors) -> Tensors:
    """Every tensor detached and on the CPU (no copy when it is already there)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


@dataclass(frozen=True)
class Measurement:
    """One output judged against its tolerance."""

    output: str
    metric: str
    value: float
    threshold: float
    passed: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        value = self.value if math.isfinite(self.value) else str(self.value)
        return {"output": self.output, "metric": self.metric, "value": value, "threshold": self.threshold, "passed": self.passed, "note": self.note}


def judge(op: str, output: str, got: torch.Tensor, expected: torch.Tensor) -> list[Measurement]:
    """Compare one output: shape, then non-finite positions, then the global metric over the
    finite elements and, where the tolerance has one, the per-element bound."""
    tol = tolerance(op, output)
    if tuple(got.shape) != tuple(expected.shape):
        return [Measurement(output, tol.metric, math.inf, tol.threshold, False, f"shape {list(got.shape)} != expected {list(expected.shape)}")]
    finite = None
    if got.is_floating_point() or expected.is_floating_point():
        g, e = got.double(), expected.double()
        nan_wrong = torch.isnan(g) != torch.isnan(e)
        inf_wrong = (torch.isinf(g) | torch.isinf(e)) & ~(torch.isnan(g) | torch.isnan(e)) & (g != e)
        for wrong, what in ((nan_wrong, "NaN where the reference has a number (unwritten or invalid), or a number where it has NaN"),
                            (inf_wrong, "infinity where the reference differs")):
            if bool(wrong.any()):
                first = tuple(int(i) for i in wrong.nonzero()[0])
                return [Measurement(
                    output, tol.metric, math.nan, tol.threshold, False,
                    f"{int(wrong.sum())} element(s) with {what}; first at {list(first)}: got {g[first].item():+g}, expected {e[first].item():+g}",
                )]
        finite = torch.isfinite(g) & torch.isfinite(e)
    if finite is not None and not bool(finite.all()):
        value = tol.measure(got[finite], expected[finite]) if bool(finite.any()) else 0.0
    else:
        value = tol.measure(got, expected)
    results = [Measurement(output, tol.metric, value, tol.threshold, tol.passes(value))]
    if tol.element is not None:
        excess, index = tol.element.excess(got, expected)
        note = ""
        if excess > 1.0:
            where = [int(i) for i in torch.unravel_index(torch.tensor(index), got.shape)]
            note = f"element {where}: got {got.flatten()[index].item():.6g}, expected {expected.flatten()[index].item():.6g}, {excess:.3g}x its bound ({tol.element.source})"
        results.append(Measurement(output, "element_excess", excess, 1.0, excess <= 1.0, note))
    return results


class Family:
    """Base of one operator's conformance logic; subclasses fill in the four steps."""

    op: str = ""

    def build(self, params: Mapping[str, Any], generator: torch.Generator) -> Tensors:
        """Random CPU inputs for ``params`` (never all zeros); outputs written in place come poisoned."""
        raise NotImplementedError

    def run(self, inputs: Tensors) -> Tensors:
        """Call the operator through the public ``hal`` API on ``inputs`` (already on the device)."""
        raise NotImplementedError

    def expect(self, inputs: Tensors) -> Tensors:
        """Expected outputs from the reference in ``hal.ops`` (CPU inputs)."""
        raise NotImplementedError

    def compare(self, got: Tensors, expected: Tensors, inputs: Tensors) -> list[Measurement]:
        """Judge every output; the default compares every key of ``expected`` with :func:`judge`."""
        return [m for name, value in expected.items() for m in judge(self.op, name, got[name], value)]


@dataclass(frozen=True)
class Case:
    """One operator with one parameter set.

    Attributes:
        family: the operator's conformance logic.
        name: readable parameter summary, unique within the operator.
        params: the parameters the family's ``build`` reads.
        quick: part of the ``--quick`` subset (small enough for CPU interpreters).
        seed: fixed seed of the input generator.
    """

    family: Family
    name: str
    params: Mapping[str, Any]
    quick: bool
    seed: int = 0

    @property
    def op(self) -> str:
        return self.family.op

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"


@dataclass
class CaseResult:
    """The outcome of one case on one backend.

    ``status`` is ``pass``, ``fail`` (an output out of tolerance), ``error`` (the backend raised),
    ``timeout``, ``crash`` (the isolated worker died) or ``unsupported`` (the backend does not
    implement the operator: reported, not certified, and a failure only with ``--require-all``).
    """

    backend: str
    case_id: str
    op: str
    status: str
    seconds: float = 0.0
    reason: str = ""
    device: str = ""
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def worst(self) -> Measurement | None:
        """The measurement closest to (or furthest beyond) its threshold."""
        def ratio(m: Measurement) -> float:
            if not m.passed:
                return math.inf
            return m.value / m.threshold if m.threshold else (0.0 if m.value == 0 else math.inf)

        return max(self.measurements, key=ratio, default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "case": self.case_id,
            "op": self.op,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
            "device": self.device,
            "measurements": [m.to_json() for m in self.measurements],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseResult:
        measurements = [
            Measurement(m["output"], m["metric"], float(m["value"]), m["threshold"], m["passed"], m.get("note", ""))
            for m in data.get("measurements", [])
        ]
        return cls(data["backend"], data["case"], data["op"], data["status"], data.get("seconds", 0.0), data.get("reason", ""), data.get("device", ""), measurements)
