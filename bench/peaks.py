"""This machine's measured limits: copy bandwidth and the matmul FLOP rate in float32 and bfloat16.

Fractions of peak are relative to these measurements, not to datasheet numbers, so they mean the
same on every machine. Each peak is the median of at least 7 runs after a warm-up, the three
measurements interleaved (one run of each per round, so a burst of load from elsewhere hits all
three alike; each timed run right after an untimed one of its own, as ``hal bench`` times its
contenders: in four back-to-back measurements on the 2-core VM, the first, without the lead-in,
read the bf16 matmul at 297 GFLOP/s and the others 411-418, with or without it), and its spread
(lowest and highest rate seen) is reported beside it: a spread of tens of percent says the
machine was shared while it was measured.

- copy: ``dst.copy_(src)`` between two preallocated, pre-touched buffers (4x the last-level
  cache on CPUs), counted as bytes read + bytes written. Allocating the destination per run
  would time page faults, not bandwidth.
- matmul: ``torch.matmul(a, b, out=c)`` of square matrices into a preallocated ``c``, 2·n³ FLOPs.
  bfloat16 is measured too because MLA decode, the FP8 GEMMs (e4m3 values are exact in bf16) and
  the bf16 GEMMs can all run their products in bf16 with fp32 accumulation: for those, the bf16
  rate is the compute bound (see :data:`hal.bench.work.Work.compute_dtype`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from hal.bench.timing import Timing, measure_interleaved

__all__ = ["Rate", "Peaks", "measured_peaks", "PEAK_REPEATS"]

PEAK_REPEATS = 9


@dataclass(frozen=True)
class Rate:
    """A measured rate (bytes/s or FLOP/s): the median run's, and the slowest and fastest run's.

    Attributes:
        median, low, high: rates of the median, slowest and fastest sample.
        repeats: samples taken.
        size: bytes per buffer (copy) or the matrices' side (matmul).
    """

    median: float
    low: float
    high: float
    repeats: int
    size: int

    @classmethod
    def of(cls, work: float, timing: Timing, size: int) -> Rate:
        return cls(work / timing.median_s, work / timing.max_s, work / timing.min_s, timing.repeats, size)

    @property
    def spread(self) -> float:
        """(high - low) / median: 0.05 is a quiet machine, 0.5 a busy one."""
        return (self.high - self.low) / self.median


@dataclass(frozen=True)
class Peaks:
    """Copy bandwidth (bytes/s) and matmul rates (FLOP/s) per dtype name (``float32``, ``bfloat16``)."""

    copy: Rate
    matmul: dict[str, Rate]

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy.median

    def flops_per_s(self, dtype: str) -> float:
        """The median matmul rate for ``dtype`` (``float32`` or ``bfloat16``)."""
        return self.matmul[dtype].median

    def to_json(self) -> dict:
        return {"copy_bytes_per_s": asdict(self.copy), "matmul_flops_per_s": {name: asdict(rate) for name, rate in self.matmul.items()}}


def _copy_elements(device: str) -> int:
    """float32 elements per copy buffer: 4x the CPU's last-level cache (at least 128 MiB); 1 GiB on GPUs."""
    if device != "cpu":
        return 2**30 // 4
    return max(128 * 2**20, 4 * _last_level_cache_bytes()) // 4


def _last_level_cache_bytes() -> int:
    """Largest cache size sysfs reports for cpu0 (0 when unknown)."""
    from pathlib import Path

    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


@functools.lru_cache(maxsize=None)
def measured_peaks(device: str, repeats: int = PEAK_REPEATS) -> Peaks:
    """Measure copy, float32 and bfloat16 matmul on ``device`` (once per process and arguments).

    Matmul sides: 2048 on CPUs (about 0.1 s a run), 8192 on GPUs.
    """
    elements = _copy_elements(device)
    source = torch.empty(elements, dtype=torch.float32, device=device).uniform_()
    destination = torch.zeros_like(source)  # zeros_: every page touched before timing
    side = 8192 if device != "cpu" else 2048
    operands = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        operands[str(dtype).removeprefix("torch.")] = (a, b, torch.zeros(side, side, dtype=dtype, device=device))
    calls = [lambda: destination.copy_(source)]
    calls += [lambda a=a, b=b, c=c: torch.matmul(a, b, out=c) for a, b, c in operands.values()]
    timings = measure_interleaved(calls, device, warmup=2, repeats=repeats, min_repeats=repeats, budget_s=0.0, lead_in=1)
    copy = Rate.of(2.0 * elements * 4, timings[0], elements * 4)
    matmul = {name: Rate.of(2.0 * side**3, timing, side) for name, timing in zip(operands, timings[1:])}
    return Peaks(copy, matmul)
