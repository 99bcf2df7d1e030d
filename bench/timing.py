"""Wall-clock timing of a callable: warm-up, then the median of repeated runs.

On CUDA each run is bracketed by CUDA events on the current stream, so the time is device time,
not launch time; on other devices by ``time.perf_counter`` around the call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "measure"]


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    repeats: int


def measure(fn: Callable[[], Any], device: str, *, warmup: int = 3, repeats: int = 20, budget_s: float = 2.0) -> Timing:
    """Time ``fn``; repeats stop early once ``budget_s`` of measured time is spent (at least 3 runs)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats and (len(samples) < 3 or spent < budget_s):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            sample = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            sample = time.perf_counter() - t0
        samples.append(sample)
        spent += sample
    return Timing(statistics.median(samples), min(samples), len(samples))
