"""A memory budget for ``hal bench``: estimate a case's peak before running it, skip it with the
reason when the estimate exceeds the budget, instead of being killed by the OOM killer halfway
through a run.

The estimate follows what :func:`hal.bench.runner.bench_case` holds at its peak:

- the case's inputs, twice: the copy every contender is timed on, and the fresh copy a
  contender's correctness check runs on;
- the outputs, once per contender (in-place outputs are private to each) plus the expected ones;
- the larger of a run's scratch and a correctness check's. A run's is a backend's, taken as the
  reference's fp32 intermediates (:func:`reference_scratch`) plus one more copy of the inputs
  (an OpenCL backend stages every buffer). A check's: the conformance judge widens output and
  reference to float64 and keeps a few temporaries of that size (:data:`CHECK_BYTES_PER_ELEMENT`);
- then, on top, the peer's formulations: each states its own scratch, at most two are alive at
  once while the fastest is chosen (:func:`hal.bench.formulation.peak_scratch`), and one that
  does not fit in what the budget leaves is left out of the choice, with the reason.

The budget is a fraction of what the kernel reports available (``MemAvailable`` in
``/proc/meminfo``) when the case starts, or a fixed size given on the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from hal.conformance.case import Tensors
from hal.ops.mla import HEAD_DIM_QK

__all__ = ["MemoryBudget", "CaseMemory", "nbytes", "available_bytes", "meminfo_bytes", "reference_scratch", "case_memory", "parse_budget", "human", "OUTPUT_KEYS"]

# Inputs that are outputs written in place (poisoned with NaN): each contender gets its own copy.
OUTPUT_KEYS = ("out", "d")
DEFAULT_FRACTION = 0.7


def human(size: float) -> str:
    """``size`` bytes for people: ``"312 KiB"``, ``"1.25 GiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def nbytes(tensors: Tensors) -> int:
    """Bytes of every tensor value in ``tensors``."""
    return sum(v.numel() * v.element_size() for v in tensors.values() if isinstance(v, torch.Tensor))


def available_bytes(device: str = "cpu") -> int:
    """Memory a new allocation can get now: CUDA's free memory, else the kernel's MemAvailable."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    return meminfo_bytes("MemAvailable", "SC_AVPHYS_PAGES")


def meminfo_bytes(field: str, pages: str) -> int:
    """A /proc/meminfo field in bytes, else sysconf's page count ``pages`` times the page size."""
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(rf"^{field}:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


def parse_budget(text: str) -> tuple[int | None, float]:
    """``"60%"`` -> (None, 0.6): a fraction of available memory; ``"8G"``, ``"512M"``, ``"2.5"`` (GiB)
    -> (bytes, 0.0): a fixed budget. Raises ValueError on anything else."""
    text = text.strip()
    if text.endswith("%"):
        fraction = float(text[:-1]) / 100
        if not 0 < fraction <= 1:
            raise ValueError(f"memory budget {text!r}: a percentage must be in (0, 100]")
        return None, fraction
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = units.get(text[-1:].upper(), 2**30)
    number = float(text[:-1] if text[-1:].upper() in units else text)
    if number <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return int(number * scale), 0.0


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``limit_bytes`` when set, else ``fraction`` of the memory available when asked."""

    limit_bytes: int | None = None
    fraction: float = DEFAULT_FRACTION

    def bytes_now(self, device: str = "cpu") -> int:
        return self.limit_bytes if self.limit_bytes is not None else int(self.fraction * available_bytes(device))

    def describe(self) -> str:
        if self.limit_bytes is not None:
            return f"{human(self.limit_bytes)}, set by --memory-budget"
        return f"{100 * self.fraction:.0f}% of available memory"

    def to_json(self, device: str = "cpu") -> dict:
        return {"limit_bytes": self.limit_bytes, "fraction": self.fraction, "bytes_at_start": self.bytes_now(device), "available_at_start": available_bytes(device)}


@dataclass(frozen=True)
class CaseMemory:
    """Estimated bytes a case holds at its peak, before its peer (see the module docstring): the
    inputs twice, every contender's outputs, and the larger of a run's scratch and a check's
    (the conformance judge widens both sides to float64 and keeps a few temporaries of that size).
    Each peer formulation adds its own scratch on top of :attr:`total`."""

    inputs: int
    outputs: int
    scratch: int
    check: int

    @property
    def total(self) -> int:
        return 2 * self.inputs + self.outputs + max(self.scratch, self.check)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "scratch": self.scratch, "check": self.check, "total": self.total}


# The judge's float64 copies of got and expected, products and per-element bound temporaries:
# about eight float64 values per output element (measured: 1.9 GB for a 4096 x 7168 output).
CHECK_BYTES_PER_ELEMENT = 64


def _mla_scratch(inputs: Tensors) -> int:
    """The MLA reference works one sequence at a time: its keys in fp32 and ~4 fp32 [rows, keys] score tensors."""
    rows = inputs["q"].shape[1] * inputs["q"].shape[2]
    longest = int(inputs["cache_seqlens"].max()) if inputs["cache_seqlens"].numel() else 0
    return longest * HEAD_DIM_QK * 4 + 4 * rows * longest * 4


def _gemm_scratch(inputs: Tensors) -> int:
    """The FP8 GEMM reference: fp32 accumulator, partial product and its two scaled temporaries
    [M, N], plus fp32 copies of one K block of A and B."""
    a, b = inputs["a"], inputs["b"]
    rows = a.shape[-2] * (a.shape[0] if a.dim() == 3 else 1)
    n = b.shape[-2]
    return 5 * rows * n * 4 + (rows + n) * 128 * 4


def reference_scratch(op: str, inputs: Tensors) -> int:
    """Bytes of intermediates the reference allocates for ``op``: modelled for MLA decode and the
    GEMMs; for other operators an fp32 copy of every input, twice over (generous: those are small)."""
    if op == "mla_decode":
        return _mla_scratch(inputs)
    if op.startswith(("gemm_", "m_grouped_")):
        return _gemm_scratch(inputs)
    return 2 * sum(v.numel() * 4 for v in inputs.values() if isinstance(v, torch.Tensor))


def case_memory(op: str, inputs: Tensors, work_bytes: float, contenders: int) -> CaseMemory:
    """Estimate for ``op`` on ``inputs`` with ``contenders`` backends and peers, before any runs.

    The outputs' size is not known before the reference runs: it is taken as the larger of twice
    the in-place outputs (references keep them unrounded, in fp32) and the work model's bytes
    beyond the inputs' (``work_bytes``: inputs read + outputs written); their element count for
    the check as the in-place outputs', else that size in bf16 elements.
    """
    in_place = [v for k, v in inputs.items() if k in OUTPUT_KEYS and isinstance(v, torch.Tensor)]
    own_outputs = sum(v.numel() * v.element_size() for v in in_place)
    expected_bytes = max(2 * own_outputs, int(work_bytes) - nbytes(inputs), 0)
    elements = sum(v.numel() for v in in_place) or expected_bytes // 2
    outputs = expected_bytes + contenders * max(own_outputs, expected_bytes)
    scratch = nbytes(inputs) + reference_scratch(op, inputs)  # a backend: staged inputs + reference-like scratch
    return CaseMemory(nbytes(inputs), outputs, scratch, elements * CHECK_BYTES_PER_ELEMENT)
