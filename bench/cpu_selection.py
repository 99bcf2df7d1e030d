"""Which backend should run CPU tensors, measured: the README's CPU tables come from this script.

    python -m hal.bench.cpu_selection            # every CPU backend on GEMM, grouped GEMM and MLA problems
    python -m hal.bench.cpu_selection --gemm     # the cpu backend's FP8 GEMMs against this machine's peaks

Candidates are interleaved (noisy shared machines drift) and each time is the median of 7 runs
after a warm-up. In ``--gemm`` the candidates are the cpu backend on its native kernels
(``cpu``), the same backend on its torch kernels (``cpu-torch``: ``HAL_CPU_NATIVE=0`` around each
call), opencl and the reference; the peaks (:func:`hal.bench.peaks.measured_peaks`: copy
bandwidth counted as bytes read + written, bf16 and fp32 ``matmul``) are measured in the same run.
Shares of peak are the native kernels': of copy bandwidth for the bytes a call must read (fp8
operands, their fp32 scales) and write (the output) at m <= 16, of the bf16 ``matmul`` rate above.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import hal
from hal.bench.timing import measure_interleaved

REPEATS = 7
GEMM_BACKENDS = ("cpu", "opencl", "reference")
MLA_BACKENDS = ("opencl", "reference")


@dataclass
class Problem:
    name: str
    run: Callable[[], object]
    backends: tuple[str, ...]
    flops: float = 0.0
    bytes: float = 0.0


def _gemm(m: int, n: int, k: int) -> Problem:
    a = hal.per_token_cast_to_fp8(torch.randn(m, k))
    b = hal.per_block_cast_to_fp8(torch.randn(n, k))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    moved = n * k + 4 * b[1].numel() + m * k + 4 * a[1].numel() + 2 * m * n
    return Problem(f"FP8 GEMM m={m}, n={n}, k={k}", lambda: hal.gemm_fp8_fp8_bf16_nt(a, b, out), GEMM_BACKENDS, 2.0 * m * n * k, moved)


def _grouped(layout: str, groups: int, rows: int, n: int, k: int) -> Problem:
    casts = [hal.per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(groups)]
    b = (torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts]))
    moved = groups * (n * k + 4 * casts[0][1].numel() + rows * k + 4 * rows * (k // 128) + 2 * rows * n)
    name = f"FP8 {layout}, {groups} groups x {rows} rows, n={n}, k={k}"
    if layout == "contiguous":
        a = hal.per_token_cast_to_fp8(torch.randn(groups * rows, k))
        m_indices = torch.arange(groups, dtype=torch.int32).repeat_interleave(rows)
        out = torch.empty(groups * rows, n, dtype=torch.bfloat16)
        run = lambda: hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out, m_indices)  # noqa: E731
    else:
        lhs = [hal.per_token_cast_to_fp8(torch.randn(rows, k)) for _ in range(groups)]
        a = (torch.stack([x[0] for x in lhs]), torch.stack([x[1] for x in lhs]))
        masked_m = torch.full((groups,), rows, dtype=torch.int32)
        out = torch.empty(groups, rows, n, dtype=torch.bfloat16)
        run = lambda: hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, b, out, masked_m, rows)  # noqa: E731
    return Problem(name, run, GEMM_BACKENDS, 2.0 * groups * rows * n * k, moved)


def _mla(batch: int, s_k: int, h_q: int) -> Problem:
    blocks = (s_k + 63) // 64
    q = torch.randn(batch, 1, h_q, 576, dtype=torch.bfloat16)
    k_cache = torch.randn(batch * blocks, 64, 1, 576, dtype=torch.bfloat16)
    block_table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    seqlens = torch.full((batch,), s_k, dtype=torch.int32)
    metadata, splits = hal.get_mla_metadata(seqlens, h_q, 1)
    run = lambda: hal.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, metadata, splits)  # noqa: E731
    return Problem(f"MLA decode b={batch}, s_k={s_k}, h_q={h_q}", run, MLA_BACKENDS)


@contextlib.contextmanager
def _candidate(name: str) -> Iterator[None]:
    """``cpu-torch`` is the cpu backend with its native kernels switched off (read per call)."""
    backend = "cpu" if name == "cpu-torch" else name
    saved = os.environ.get("HAL_CPU_NATIVE")
    if name == "cpu-torch":
        os.environ["HAL_CPU_NATIVE"] = "0"
    try:
        with hal.use_backend(backend):
            yield
    finally:
        if name == "cpu-torch":
            if saved is None:
                os.environ.pop("HAL_CPU_NATIVE", None)
            else:
                os.environ["HAL_CPU_NATIVE"] = saved


def _runnable(candidates: tuple[str, ...]) -> tuple[str, ...]:
    kept = []
    for name in candidates:
        backend = hal.get_backend("cpu" if name == "cpu-torch" else name)
        if backend.available:
            kept.append(name)
        else:
            print(f"  ({name} skipped: {backend.availability().reason})")
    return tuple(kept)


def _time(problem: Problem, candidates: tuple[str, ...]) -> dict[str, float]:
    def call(name: str) -> Callable[[], object]:
        def run() -> object:
            with _candidate(name):
                return problem.run()

        return run

    timings = measure_interleaved([call(c) for c in candidates], "cpu", warmup=1, repeats=REPEATS, min_repeats=REPEATS, budget_s=0.0)
    return {c: t.median_s for c, t in zip(candidates, timings)}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds * 1e3:.0f} ms"


def selection() -> None:
    problems = [
        _gemm(16, 7168, 2048), _gemm(512, 2048, 2048), _grouped("contiguous", 8, 256, 4096, 7168),
        _mla(8, 1024, 128), _mla(4, 4096, 16),
    ]
    for problem in problems:
        candidates = _runnable(problem.backends)
        times = _time(problem, candidates)
        best = min(times, key=times.get)
        cells = "  ".join(f"{c} {_ms(t):>10} ({t / times[best]:4.2f}x)" for c, t in times.items())
        print(f"{problem.name:52} {cells}", flush=True)


def gemm_table() -> None:
    from hal.bench.peaks import measured_peaks

    peaks = measured_peaks("cpu", repeats=REPEATS)
    copy, bf16, fp32 = peaks.copy.median, peaks.matmul["bfloat16"].median, peaks.matmul["float32"].median
    print(f"peaks ({torch.get_num_threads()} threads): copy {copy / 1e9:.1f} GB/s (read + write), bf16 matmul {bf16 / 1e9:.0f} GFLOP/s, "
          f"fp32 matmul {fp32 / 1e9:.0f} GFLOP/s", flush=True)
    problems = [_gemm(m, n, k) for n, k in ((7168, 2048), (2112, 7168), (4096, 7168)) for m in (1, 4, 16)]
    problems += [_gemm(256, 7168, 2048), _gemm(1024, 7168, 2048)]
    problems += [_grouped("contiguous", 8, 256, 4096, 7168), _grouped("masked", 8, 256, 4096, 7168)]
    candidates = _runnable(("cpu", "cpu-torch", "opencl", "reference"))
    print(f"| problem | {' | '.join(candidates)} | native GFLOP/s | native GB/s | native share of peak |")
    print("|---|" + "---|" * (len(candidates) + 3))
    for problem in problems:
        times = _time(problem, candidates)
        native = times.get("cpu")
        share = ""
        if native:
            small = "m=1," in problem.name or "m=4," in problem.name or "m=16," in problem.name
            share = f"{problem.bytes / native / copy:.0%} of copy" if small else f"{problem.flops / native / bf16:.0%} of bf16 matmul"
        rates = f"{problem.flops / native / 1e9:.0f} | {problem.bytes / native / 1e9:.1f}" if native else " | "
        print(f"| {problem.name} | {' | '.join(_ms(times[c]) for c in candidates)} | {rates} | {share} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hal.bench.cpu_selection", description=__doc__.split("\n")[0])
    parser.add_argument("--gemm", action="store_true", help="the cpu backend's FP8 GEMMs (native and torch kernels) against the peaks")
    args = parser.parse_args()
    torch.manual_seed(0)
    gemm_table() if args.gemm else selection()


if __name__ == "__main__":
    main()
