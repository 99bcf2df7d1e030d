"""Multi-process EP benchmark: bytes moved per second per rank, and the ratio to a plain all_to_all.

::

    python -m hal.ep.bench --world-size 4            # spawns 4 local gloo ranks (CPU)
    torchrun --nproc-per-node 8 -m hal.ep.bench      # one rank per process: NCCL on GPUs, else gloo

Each case times one Buffer operation (median of ``--repeats`` runs, each started after a
barrier) and, on the same split sizes and payload bytes, a bare ``all_to_all_single``: what the
exchange costs with nothing around it. Bytes are counted as DeepEP's tests count them: the token
payload (hidden states, plus FP8 scales) a rank receives in a dispatch, and sends in a combine.
Reported per case: ``bytes_per_s_per_rank`` (mean over ranks of bytes / median time),
``median_s`` (slowest rank) and ``ratio_to_all_to_all`` (all_to_all time / operation time: 1.0
means the EP machinery costs nothing beyond the exchange).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hal.ep.buffer import Buffer
from hal.ep.comm import group_device
from hal.ep.launch import run_local
from hal.ops.fp8_quant import per_token_cast_to_fp8

__all__ = ["CASES", "DEFAULTS", "run", "bench_rank", "summarise", "main"]

CASES = (
    "ep_dispatch/bf16", "ep_dispatch/fp8", "ep_combine/bf16", "ep_dispatch+combine/bf16",
    "ep_low_latency_dispatch/bf16", "ep_low_latency_dispatch/fp8", "ep_low_latency_combine/bf16",
)


def _median_time(run: Callable[[], Any], group: dist.ProcessGroup, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        dist.barrier(group)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _all_to_all(send: list[int], recv: list[int], row_bytes: int, device: torch.device, group: dist.ProcessGroup) -> Callable[[], Any]:
    rows = torch.zeros(sum(send), row_bytes, dtype=torch.uint8, device=device)
    out = torch.empty(sum(recv), row_bytes, dtype=torch.uint8, device=device)
    return lambda: dist.all_to_all_single(out, rows, recv, send, group=group)


def _cases(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor, experts: int, group: dist.ProcessGroup) -> dict[str, tuple[Callable[[], Any], list[int], list[int], int]]:
    """Each case: (the operation, rows sent to each rank, rows received from each, bytes per row)."""
    tokens, hidden = x.shape
    world = dist.get_world_size(group)
    x_fp8 = per_token_cast_to_fp8(x)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}
    send_rows = per_rank.tolist()
    recv_rows = _exchange_counts(send_rows, group)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    ll_x, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False)
    selections = torch.bincount(topk_idx.flatten().cpu(), minlength=experts).view(world, -1).sum(dim=1).tolist()
    ll_recv = _exchange_counts(selections, group)
    fp8_row = hidden + hidden // 128 * 4

    def round_trip() -> None:  # a MoE layer's communication: dispatch, then combine of the received rows
        received, _, _, _, trip, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
        buffer.combine(received, trip)

    both = [s + r for s, r in zip(send_rows, recv_rows)]  # the all_to_all peer moves both payloads
    return {
        "ep_dispatch/bf16": (lambda: buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout), send_rows, recv_rows, 2 * hidden),
        "ep_dispatch/fp8": (lambda: buffer.dispatch(x_fp8, topk_idx=topk_idx, topk_weights=weights, **layout), send_rows, recv_rows, fp8_row),
        "ep_combine/bf16": (lambda: buffer.combine(recv_x, handle), recv_rows, send_rows, 2 * hidden),
        "ep_dispatch+combine/bf16": (round_trip, both, [s + r for s, r in zip(recv_rows, send_rows)], 2 * hidden),
        "ep_low_latency_dispatch/bf16": (lambda: buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=False), selections, ll_recv, 2 * hidden),
        "ep_low_latency_dispatch/fp8": (lambda: buffer.low_latency_dispatch(x, topk_idx, tokens, experts, use_fp8=True), selections, ll_recv, fp8_row),
        "ep_low_latency_combine/bf16": (lambda: buffer.low_latency_combine(ll_x, topk_idx, weights, ll_handle), ll_recv, selections, 2 * hidden),
    }


def bench_rank(rank: int, world: int, config: dict[str, int], transports: tuple[str, ...] = ("auto",), cases: tuple[str, ...] = CASES) -> list[dict[str, Any]]:
    """Run ``cases`` on this rank for each transport (all ranks call it together); returns this rank's records.

    Transports are measured one after the other on each case, each beside its own all_to_all
    baseline, so that their ratios come from one run.
    """
    group = dist.group.WORLD
    device = group_device(group)
    tokens, hidden, topk, experts = config["tokens"], config["hidden"], config["topk"], config["experts_per_rank"] * world
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16).to(device)
    topk_idx = torch.rand(tokens, experts, generator=generator).topk(topk, dim=1).indices.to(device)
    weights = torch.rand(tokens, topk, generator=generator).to(device)
    buffers = {name: Buffer(group, transport=None if name == "auto" else name) for name in transports}
    prepared = {name: _cases(buffer, x, topk_idx, weights, experts, group) for name, buffer in buffers.items()}
    records = []
    for name in cases:
        for transport, buffer in buffers.items():
            run, send, recv, row_bytes = prepared[transport][name]
            moved = (sum(recv) if "dispatch" in name else sum(send)) * row_bytes
            operation = _median_time(run, group, device, config["repeats"])
            baseline = _median_time(_all_to_all(send, recv, row_bytes, device, group), group, device, config["repeats"])
            records.append({"case": name, "transport": buffer.transport.name, "rank": rank, "bytes": moved, "median_s": operation,
                            "all_to_all_median_s": baseline})
    return records


def _exchange_counts(send: list[int], group: dist.ProcessGroup) -> list[int]:
    """What each rank sends this one, given what this one sends each rank."""
    device = group_device(group)
    mine = torch.tensor(send, dtype=torch.int64, device=device)
    theirs = torch.empty_like(mine)
    dist.all_to_all_single(theirs, mine, group=group)
    return theirs.tolist()


def summarise(per_rank: list[list[dict[str, Any]]], config: dict[str, int]) -> list[dict[str, Any]]:
    """One record per (case, transport) from every rank's records (all ranks list them alike)."""
    world = len(per_rank)
    summary = []
    for index, first in enumerate(per_rank[0]):
        records = [ranks[index] for ranks in per_rank]
        operation = max(r["median_s"] for r in records)
        baseline = max(r["all_to_all_median_s"] for r in records)
        summary.append({
            "case": first["case"], "transport": first["transport"], "world_size": world, **config,
            "bytes_per_rank": statistics.mean(r["bytes"] for r in records),
            "bytes_per_s_per_rank": statistics.mean(r["bytes"] / r["median_s"] for r in records),
            "median_s": operation, "all_to_all_median_s": baseline, "ratio_to_all_to_all": baseline / operation,
        })
    return summary


def _table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'case':30} {'transport':>9} {'ranks':>5} {'MB/rank':>9} {'median ms':>10} {'MB/s/rank':>10} {'a2a ms':>8} {'vs a2a':>7}"]
    for s in summary:
        lines.append(
            f"{s['case']:30} {s['transport']:>9} {s['world_size']:5d} {s['bytes_per_rank'] / 1e6:9.3f} {s['median_s'] * 1e3:10.3f} "
            f"{s['bytes_per_s_per_rank'] / 1e6:10.1f} {s['all_to_all_median_s'] * 1e3:8.3f} {s['ratio_to_all_to_all']:7.2f}"
        )
    return "\n".join(lines)


DEFAULTS = {"tokens": 256, "hidden": 2048, "topk": 8, "experts_per_rank": 8, "repeats": 10, "seed": 0}


def run(
    world_size: int = 4, backend: str | None = None, *, transports: tuple[str, ...] = ("auto",), cases: tuple[str, ...] = CASES, **config: int
) -> list[dict[str, Any]] | None:
    """Benchmark ``cases`` on each of ``transports``; the summary (one record per case and transport).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this process is one rank, ``world_size`` is
    ignored, and only rank 0 gets the summary (the others get None). Otherwise ``world_size``
    local gloo ranks are spawned, each running its local operators on ``backend``
    (``HAL_BACKEND`` in every rank; None: the ranks select as usual). ``transports``: ``"auto"``
    (what a Buffer selects), ``"torch"``, ``"shm"``. ``config`` overrides :data:`DEFAULTS`.
    """
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown EP bench case(s) {unknown}; known: {', '.join(CASES)}")
    settings = DEFAULTS | config
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bench_rank(dist.get_rank(), dist.get_world_size(), settings, tuple(transports), tuple(cases)))
        rank = dist.get_rank()
        dist.destroy_process_group()
        return summarise(gathered, settings) if rank == 0 else None
    env = {} if backend is None else {"HAL_BACKEND": backend}
    outcomes = run_local(bench_rank, world_size, settings, tuple(transports), tuple(cases), timeout_s=1200, env=env)
    failed = [f"rank {o.rank}: {o.error or f'exit code {o.exitcode}'}" for o in outcomes if not o.returned]
    if failed:
        raise RuntimeError("EP benchmark failed: " + "; ".join(failed))
    return [record | {"backend": backend or "auto"} for record in summarise([o.value for o in outcomes], settings)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.ep.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=4, help="local gloo ranks to spawn (ignored under torchrun)")
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    parser.add_argument("--backend", help="backend every rank runs its local operators on (default: each rank selects)")
    parser.add_argument("--transport", action="append", choices=("auto", "torch", "shm"),
                        help="EP transport to measure (repeat to compare several in one run; default: auto)")
    parser.add_argument("--case", action="append", choices=CASES, help="case to run (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = vars(parser.parse_args(argv))
    summary = run(args.pop("world_size"), args.pop("backend"), transports=tuple(args["transport"] or ("auto",)),
                  cases=tuple(args["case"] or CASES), **{name: args[name] for name in DEFAULTS})
    if summary is not None:
        print(json.dumps(summary, indent=2) if args["json"] else _table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
