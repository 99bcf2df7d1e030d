"""Cold caches between timed runs: what ``hal bench`` does before each sample, and why.

A decode step reads every layer's weights once: DeepSeek-V3's are far larger than any cache, so
each GEMM and each attention call finds its weights (and KV pages) in DRAM. A benchmark that calls
one kernel over and over on the same inputs instead finds them in the last-level cache whenever
they fit (a 15 MB FP8 weight on a CPU with a 32 MiB L3; up to 50 MB on an H100's L2), and then
reports the cache's bandwidth as the kernel's: fractions of the DRAM copy bound above 100%.

So before every timed run (outside the timed interval) the bench writes a buffer larger than the
last-level cache, as DeepGEMM's benchmarks flush the L2 before each kernel: every case starts
from memory, as in a model. ``hal bench --hot-cache`` skips it, to time the warm-cache case.

- CPU: a float32 buffer of twice the largest cache ``/sys/devices/system/cpu`` reports (at least
  64 MiB when it reports none), read by one torch call (all intra-op threads, so every core's
  private caches are refilled too); read, not written, so that no dirty line is left to be
  written back during the timed run.
- CUDA: a 256 MiB buffer zeroed on the current stream (H100 and H200 have 50 MB of L2).
- Other devices: no flush; the report says so.

On CPUs the flush also evicts the host path's own data (the interpreter's objects, hal's caches):
a K=128 FP8 GEMM taking 41 us warm takes about 200 us right after a flush, so every CPU time
carries about 0.15 ms a model's step would not pay. Rotating copies of the inputs through more than
the cache would avoid it.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CacheFlush", "cache_flush", "last_level_cache_bytes"]

_CPU_FLOOR = 64 << 20
_CUDA_BYTES = 256 << 20


def _size_bytes(text: str) -> int:
    """``"32768K"``, ``"1M"``, ``"512"`` (sysfs cache sizes) in bytes; 0 when unreadable."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else 0


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (the L3 on x86 servers), or 0 when none is reported."""
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*/size"):
        try:
            with open(path) as f:
                largest = max(largest, _size_bytes(f.read()))
        except OSError:
            continue
    return largest


@dataclass
class CacheFlush:
    """Callable that evicts ``device``'s caches; ``bytes`` 0 means it does nothing there."""

    device: str
    bytes: int
    hot: bool = False
    _buffer: torch.Tensor | None = None

    def __call__(self) -> None:
        if self.bytes == 0:
            return
        if self._buffer is None:
            # Written once, so that its pages are real (an untouched buffer maps every page to the
            # kernel's one zero page, and reading it would evict nothing) and its lines clean later.
            self._buffer = torch.ones(self.bytes // 4, dtype=torch.float32, device=self.device)
        if self.device == "cuda":
            self._buffer.zero_()
            torch.cuda.synchronize()
        else:
            # Read, not written: written lines would be dirty, and writing them back to memory
            # would take bandwidth from the timed run that evicts them.
            self._buffer.sum()

    def release(self) -> None:
        self._buffer = None

    def to_json(self) -> dict[str, Any]:
        if self.hot:
            return {"policy": "hot: inputs may stay cached between runs (--hot-cache)"}
        if self.bytes == 0:
            return {"policy": "not flushed", "why": f"no cache flush is known for {self.device} devices"}
        return {"policy": "flushed before every timed run", "bytes": self.bytes}


def cache_flush(device: str, *, hot: bool = False) -> CacheFlush:
    """The flush ``hal bench`` runs before each timed run on ``device`` (a no-op with ``hot``)."""
    if hot:
        return CacheFlush(device, 0, hot=True)
    if device == "cpu":
        return CacheFlush(device, max(2 * last_level_cache_bytes(), _CPU_FLOOR))
    if device == "cuda":
        return CacheFlush(device, _CUDA_BYTES)
    return CacheFlush(device, 0)
