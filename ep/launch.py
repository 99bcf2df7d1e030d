"""Run a function on N local processes joined in a gloo group: EP on one CPU machine.

``run_local(fn, world_size, *args)`` spawns one process per rank, initialises
torch.distributed (gloo, file rendezvous) in each, calls ``fn(rank, world_size, *args)`` and
returns every rank's outcome, including ranks that raised, exited or never finished. The
benchmark (:mod:`hal.ep.bench`) and the multi-process tests use it; ``fn`` must be importable
by name (a module-level function).
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankOutcome", "run_local", "retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in this process's heap (glibc), so reusing them costs no page faults.

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free: each EP
    call then faults in every page of its message and result tensors again, which costs more than
    the copies themselves (measured: a 2-rank combine of 4096 x 7168 bf16 went from 696 ms to
    71 ms). Raising the mmap and trim thresholds keeps freed blocks for reuse, as tcmalloc or
    jemalloc (the allocators CPU inference servers preload) do. Process-wide; returns False where
    glibc's ``mallopt`` is not available. The same effect from outside:
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648``.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class RankOutcome:
    """What one rank did.

    Attributes:
        rank: the rank.
        value: what ``fn`` returned (None unless it returned).
        error: ``"TypeName: message"`` if ``fn`` raised, else "".
        exitcode: the process's exit status, or None if it was still running at the deadline (then killed).
    """

    rank: int
    value: Any = None
    error: str = ""
    exitcode: int | None = None

    @property
    def returned(self) -> bool:
        return self.exitcode == 0 and not self.error


def _rank_main(
    fn: Callable[..., Any], rank: int, world_size: int, rendezvous: str, args: tuple, env: Mapping[str, str], results: Any, backend: str = "gloo"
) -> None:
    os.environ.update(env)
    retain_freed_memory()
    # As torchrun does (OMP_NUM_THREADS=1 for several ranks): ranks sharing cores must not each
    # start a full intra-op thread pool, or every small kernel waits on oversubscribed threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend == "nccl":  # one GPU per rank, as torchrun's LOCAL_RANK convention
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        # torch.save bytes, not the queue's pickling: torch's shared-memory tensor passing would
        # need this process alive until the parent reads, and it exits right after.
        value = io.BytesIO()
        torch.save(fn(rank, world_size, *args), value)
        results.put((rank, value.getvalue(), ""))
    except Exception as exc:  # reported to the parent, which decides what an error means
        results.put((rank, None, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
    backend: str = "gloo",
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; wait at most ``timeout_s``.

    Args:
        fn: a module-level function returning tensors, numbers, strings, or lists/tuples/dicts of them.
        world_size: number of processes.
        args: extra arguments (must pickle).
        timeout_s: the whole run's bound; ranks still running then are killed (exitcode None).
        env: environment variables set in every rank before torch.distributed starts.
        backend: the process group's backend: ``gloo``, or ``nccl`` with rank r on GPU r.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="hal-ep-") as directory:
        rendezvous = str(Path(directory) / "rendezvous")
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, rendezvous, args, dict(env or {}), results, backend), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        reported: dict[int, tuple[Any, str]] = {}
        deadline = time.monotonic() + timeout_s
        while len(reported) < world_size and time.monotonic() < deadline:
            try:
                rank, data, error = results.get(timeout=0.1)
                reported[rank] = (torch.load(io.BytesIO(data), weights_only=True) if data is not None else None, error)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
        outcomes = []
        for rank, process in enumerate(processes):
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
                exitcode = None
            else:
                exitcode = process.exitcode
            value, error = reported.get(rank, (None, ""))
            outcomes.append(RankOutcome(rank, value, error, exitcode))
    return outcomes
