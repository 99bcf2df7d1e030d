"""Cold caches between timed runs: what ``hal bench`` does before each sample, and why.

A decode step reads every layer's weights once: DeepSeek-V3's are far larger than any cache, so
each GEMM and each attention call finds its weights (and KV pages) in DRAM. A benchmark that calls
one kernel over and over on the same inputs instead finds them in the last-level cache whenever
they fit (a 15 MB FP8 weight on a CPU with a 32 MiB L3; up to 50 MB on an H100's L2), and then
reports the cache's bandwidth as the kernel's: fractions of the DRAM copy bound above 100%.

So every timed run starts with its inputs out of the caches, as in a model:

- CPU: the timed runs rotate through copies of the case's inputs that together fill twice the
  largest cache ``/sys/devices/system/cpu`` reports (at least 64 MiB; :func:`input_sets`): the
  k-th run of any contender takes set k mod the number of sets, so a run's inputs were last
  touched a full rotation ago (every other set read since), and the host path's own data (the
  interpreter's objects, hal's caches) stays warm, as it does in a model's step. Where several
  contenders take turns, a buffer of the same size is read before each one's untimed lead-in
  run, so that the lines the previous contender left (dirty ones too, whose write-back would be
  charged to the next timed run) are gone before it starts. A flush would
  evict it too: a K=128 FP8 GEMM taking 41 us warm takes about 200 us right after one. Inputs
  that fill the target alone are one set; when the sets needed do not fit the memory budget, a
  buffer of the target's size is read before each run instead (outside the timed interval).
- CUDA: a 256 MiB buffer zeroed on the current stream before each run (H100 and H200 have 50 MB
  of L2), as DeepGEMM's benchmarks flush the L2; the host is not touched.
- Other devices: nothing; the report says so.

``hal bench --hot-cache`` does none of it, to time the warm-cache case. Each case's record says
what was done (``caches``: the number of input sets, whether a flush ran).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CacheFlush", "cache_flush", "input_sets", "last_level_cache_bytes"]

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
        if self.device == "cpu":
            return {"policy": "inputs rotated through copies filling twice the last-level cache, and a read of as many bytes before each "
                              "contender's lead-in run (else flushed before every timed run)", "bytes": self.bytes}
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


# More copies than this and a tiny case's copies cost more to make than they are worth: a case of a
# few kilobytes would need thousands to fill a cache, and its time is its launch, not its inputs'
# trip (in a model, such small operands were just written by the step before, and are cached).
MAX_INPUT_SETS = 16


def input_sets(flush: CacheFlush, input_bytes: int, room_bytes: int | None, extra_per_set: int = 0) -> tuple[int, bool]:
    """``(sets, flush)``: how many sets of a case's inputs the timed runs rotate through, and whether
    ``flush`` must run before each. On a CPU: enough sets to fill ``flush.bytes`` (twice the
    last-level cache), at most :data:`MAX_INPUT_SETS`, no flush; one set and no flush when it fills
    the target alone; one set and the flush when the sets needed do not fit ``room_bytes`` (each
    takes ``input_bytes`` plus ``extra_per_set``, the peers' prepared data). Elsewhere one set, and
    the flush where ``flush`` has one; with ``--hot-cache`` neither."""
    if flush.hot:
        return 1, False
    if flush.device != "cpu" or flush.bytes == 0:
        return 1, flush.bytes > 0
    if input_bytes >= flush.bytes:
        return 1, False
    sets = min(-(-flush.bytes // max(input_bytes, 1)), MAX_INPUT_SETS)
    if room_bytes is not None and (sets - 1) * (input_bytes + extra_per_set) > room_bytes:
        return 1, True
    return sets, False
