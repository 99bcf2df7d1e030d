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


def judge(op: str, output: str, got: torch.Tensor, expected: torch.Tensor) -> Measurement:
    """Compare one output: shape and NaN checks first, then the operator's metric."""
    tol = tolerance(op, output)
    if tuple(got.shape) != tuple(expected.shape):
        return Measurement(output, tol.metric, math.inf, tol.threshold, False, f"shape {list(got.shape)} != expected {list(expected.shape)}")
    if got.is_floating_point() and bool(torch.isnan(got).any()):
        count = int(torch.isnan(got).sum())
        return Measurement(output, tol.metric, math.nan, tol.threshold, False, f"{count} NaN element(s): unwritten or invalid")
    value = tol.measure(got, expected)
    return Measurement(output, tol.metric, value, tol.threshold, tol.passes(value))


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
        return [judge(self.op, name, got[name], value) for name, value in expected.items()]


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
