"""Formulations of a peer, and how ``hal bench`` picks the one it times.

A peer such as "torch" can compute an operator in several ways (a loop over sequences or one
padded batched matmul; fp32 or bf16 products; SDPA's fused kernel). Which is fastest depends on
the shape and the machine, and a formulation that is fast but numerically off is no peer at all.
So for every case each formulation that fits in memory is prepared, checked against the
reference with the conformance tolerance, and, if it passes, timed briefly; the fastest correct
one becomes the peer, and every other formulation's fate (slower, wrong, over budget, error) is
reported beside it. A peer is therefore never slow by accident of formulation: the issue this
replaces was SDPA with ``V = K[..., :512]``, which takes torch's math path (it repeats K per
head and materialises every score): 229 ms against 2.6 ms for a per-sequence fp32 matmul on a
2-core CPU (MLA decode, 4 sequences of ~160 keys, 64 heads), and 12.7 GB on the largest case.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hal.bench.memory import human
from hal.conformance.case import Tensors

__all__ = ["Prepared", "Formulation", "Choice", "choose_fastest", "usable", "peak_scratch"]

# A formulation whose checked run took longer than this is timed on that run alone: a second
# and third run would only confirm what a factor-of-two difference already says.
_SINGLE_RUN_S = 0.5


@dataclass(frozen=True)
class Prepared:
    """A formulation ready to run on one case's inputs: ``call()`` computes the result (what is
    timed); ``outputs()`` computes it and returns the outputs under the conformance family's names."""

    call: Callable[[], Any]
    outputs: Callable[[], Tensors]


@dataclass(frozen=True)
class Formulation:
    """One way to compute an operator.

    Attributes:
        name: what it does, for people ("per-sequence fp32 matmul").
        prepare: inputs (on the device) -> :class:`Prepared`; work a user would do once per
            model (dequantising static weights) belongs here, per-call work in ``call``.
        scratch: inputs -> bytes the prepared state and one call's intermediates take at most.
        devices: device types it runs on (None: any).
    """

    name: str
    prepare: Callable[[Tensors], Prepared]
    scratch: Callable[[Tensors], int]
    devices: tuple[str, ...] | None = None


@dataclass
class Choice:
    """The chosen formulation (None when none was correct and fit) and one record per formulation."""

    name: str | None = None
    prepared: Prepared | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)


def _seconds(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def choose_fastest(formulations: Sequence[Formulation], inputs: Tensors, device: str, check: Callable[[Tensors], str], room_bytes: int | None) -> Choice:
    """Prepare, check and time each formulation that runs on ``device`` in turn; keep the fastest
    that passes ``check`` (which returns why outputs are wrong, or ""). Only the best so far stays
    alive beside the one being tried, so a formulation is not prepared when its scratch plus the
    best one's exceeds ``room_bytes`` (None: no limit)."""
    choice = Choice()
    best_s, held = float("inf"), 0
    for formulation in usable(formulations, device):
        record: dict[str, Any] = {"formulation": formulation.name}
        choice.tried.append(record)
        need = formulation.scratch(inputs)
        if room_bytes is not None and need + held > room_bytes:
            record.update(status="over budget", note=f"needs ~{human(need)}, {human(max(room_bytes - held, 0))} left in the memory budget")
            continue
        try:
            prepared = formulation.prepare(inputs)
            first_s, outputs = _seconds(prepared.outputs)
            why = check(outputs)
            del outputs
            if why:
                record.update(status="wrong", note=why)
                continue
            samples = [first_s]
            if first_s < _SINGLE_RUN_S:
                samples += [_seconds(prepared.call)[0] for _ in range(2)]
        except Exception as exc:  # a formulation torch cannot run here (dtype, device, API) is reported, not fatal
            record.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
            continue
        record.update(status="correct", trial_median_s=statistics.median(samples))
        if record["trial_median_s"] < best_s:
            best_s, held = record["trial_median_s"], need
            choice.name, choice.prepared = formulation.name, prepared
    for record in choice.tried:
        if record["status"] == "correct":
            record["status"] = "chosen" if record["formulation"] == choice.name else "slower"
    return choice


def usable(formulations: Sequence[Formulation], device: str) -> list[Formulation]:
    """The formulations that run on ``device``."""
    return [f for f in formulations if f.devices is None or device in f.devices]


def peak_scratch(formulations: Sequence[Formulation], inputs: Tensors, device: str, room_bytes: int | None) -> int:
    """Bytes the choice can hold at once: the two largest scratches among formulations that fit
    (the best so far and the one being tried)."""
    sizes = sorted((f.scratch(inputs) for f in usable(formulations, device)), reverse=True)
    fitting = [size for size in sizes if room_bytes is None or size <= room_bytes]
    return sum(fitting[:2])
