"""Which backend should run CPU tensors: opencl against reference on decode-sized problems.

    python -m hal.bench.cpu_selection

Candidates are interleaved (noisy shared machines drift) and each time is the median of 7 runs
after a warm-up; the README's CPU selection table comes from this script.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import hal

CANDIDATES = ("opencl", "reference")
REPEATS = 7


def _gemm(m: int, n: int, k: int) -> Callable[[], object]:
    a = hal.per_token_cast_to_fp8(torch.randn(m, k))
    b = hal.per_block_cast_to_fp8(torch.randn(n, k))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    return lambda: hal.gemm_fp8_fp8_bf16_nt(a, b, out)


def _mla(batch: int, s_k: int, h_q: int) -> Callable[[], object]:
    blocks = (s_k + 63) // 64
    q = torch.randn(batch, 1, h_q, 576, dtype=torch.bfloat16)
    k_cache = torch.randn(batch * blocks, 64, 1, 576, dtype=torch.bfloat16)
    block_table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    seqlens = torch.full((batch,), s_k, dtype=torch.int32)
    metadata, splits = hal.get_mla_metadata(seqlens, h_q, 1)
    return lambda: hal.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, metadata, splits)


def main() -> None:
    torch.manual_seed(0)
    cases = {
        "FP8 GEMM m=16, n=7168, k=2048": _gemm(16, 7168, 2048),
        "FP8 GEMM m=512, n=2048, k=2048": _gemm(512, 2048, 2048),
        "MLA decode b=8, s_k=1024, h_q=128": _mla(8, 1024, 128),
        "MLA decode b=4, s_k=4096, h_q=16": _mla(4, 4096, 16),
    }
    for name, run in cases.items():
        times: dict[str, list[float]] = {backend: [] for backend in CANDIDATES}
        for backend in CANDIDATES:  # warm-up: compile, allocate
            with hal.use_backend(backend):
                run()
        for _ in range(REPEATS):
            for backend in CANDIDATES:
                with hal.use_backend(backend):
                    start = time.perf_counter()
                    run()
                    times[backend].append(time.perf_counter() - start)
        opencl, reference = (statistics.median(times[b]) for b in CANDIDATES)
        print(f"{name:34} opencl {opencl * 1e3:8.2f} ms  reference {reference * 1e3:8.2f} ms  reference/opencl {reference / opencl:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
