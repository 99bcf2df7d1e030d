"""Wall-clock timing of callables: warm-up, then the median of repeated runs, candidates interleaved.

On CUDA each run is bracketed by CUDA events on the current stream, so the time is device time,
not launch time; on other devices by ``time.perf_counter`` around the call.

Several candidates are timed round-robin (one run of each, then the next round) rather than one
after the other: on a shared machine the load drifts over seconds, and interleaving spreads that
drift over every candidate instead of penalising whichever happened to run during a busy spell.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "measure", "measure_interleaved", "MIN_REPEATS"]

# Fewer samples than this and the median of a shared machine's timings moves by tens of percent
# from one invocation to the next; 7 is the floor the project's reference numbers use.
MIN_REPEATS = 7


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, fastest and slowest sample, and how many samples were taken."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def spread(self) -> dict[str, float | int]:
        """The JSON form: ``{"min_s", "median_s", "max_s", "repeats"}``."""
        return {"min_s": self.min_s, "median_s": self.median_s, "max_s": self.max_s, "repeats": self.repeats}


def _timed_call(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_interleaved(
    fns: Sequence[Callable[[], Any]], device: str, *, warmup: int = 2, repeats: int = 20, budget_s: float = 2.0, min_repeats: int = MIN_REPEATS,
    before: Callable[[], Any] | None = None, lead_in: int = 0, settle: Callable[[], Any] | None = None,
) -> list[Timing]:
    """Time every callable in ``fns``, one run of each per round.

    ``before`` runs before every timed run, outside the timed interval (``hal bench`` evicts the
    caches there, :mod:`hal.bench.cache`). ``lead_in``: untimed runs of the same callable right
    before each timed one (before ``before``), so that a timed run follows its own kind of work,
    not another candidate's (see :data:`hal.bench.runner.LEAD_IN`). ``settle`` runs before each
    candidate's lead-in, untimed: ``hal bench`` reads a buffer of twice the last-level cache there,
    so that what the previous candidate left in the caches is gone before this one starts.

    Rounds continue until ``repeats`` rounds are done, or, once ``min(min_repeats, repeats)``
    rounds are done, until the time spent exceeds ``budget_s`` per callable. Returns one
    :class:`Timing` per callable, in order.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[list[float]] = [[] for _ in fns]
    floor = min(min_repeats, repeats)
    spent = 0.0
    rounds = 0
    while rounds < repeats and (rounds < floor or spent < budget_s * len(fns)):
        for fn, own in zip(fns, samples):
            if settle is not None:
                settle()
            for _ in range(lead_in):
                fn()
            if before is not None:
                before()
            own.append(_timed_call(fn, device))
            spent += own[-1]
        rounds += 1
    return [Timing(statistics.median(s), min(s), max(s), len(s)) for s in samples]


def measure(fn: Callable[[], Any], device: str, *, warmup: int = 3, repeats: int = 20, budget_s: float = 2.0, min_repeats: int = MIN_REPEATS) -> Timing:
    """Time one callable: :func:`measure_interleaved` with a single candidate."""
    return measure_interleaved([fn], device, warmup=warmup, repeats=repeats, budget_s=budget_s, min_repeats=min_repeats)[0]
