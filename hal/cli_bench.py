"""``hal bench``: time backends and peers on the conformance cases; fractions of peak and ratios."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hal.cli_cases import add_case_filters, resolve_backends, selected_cases
from hal.errors import HalError

DEFAULT_RESULTS = Path("bench/results")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="time operators on backends and installed peers",
        description="Median time per case, achieved bandwidth and FLOP rate, fraction of this machine's measured peak, ratio to every other contender.",
    )
    parser.add_argument("--backend", action="append", default=[], help="backend to time (repeatable; default: every available backend)")
    add_case_filters(parser)
    parser.add_argument("--no-peers", action="store_true", help="time backends only")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per contender (median reported)")
    parser.add_argument("--ep-world-size", type=int, default=4, help="gloo ranks spawned for the multi-process EP cases (--op ep_*)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", nargs="?", const=DEFAULT_RESULTS, type=Path, metavar="DIR", help=f"write results JSON under DIR (default {DEFAULT_RESULTS})")
    parser.set_defaults(run=run)


def _rate(entry: dict) -> tuple[str, str]:
    return f"{entry['bytes_per_s'] / 1e9:.2f}", f"{entry['flops_per_s'] / 1e12:.3f}"


# What a rank runs locally in dispatch and combine; a backend must implement them to be timed there.
EP_LOCAL_OPERATORS = ("ep_dispatch_layout", "ep_pack", "ep_unpack", "ep_combine_reduce")


def _bench_ep(args: argparse.Namespace, console: Console) -> tuple[list[dict], dict[str, str]]:
    """The multi-process EP cases: on each named backend (every rank runs on it), else as ranks select."""
    from hal import registry
    from hal.ep.bench import run as run_ep_bench
    from hal.operator import get_operator

    records: list[dict] = []
    skipped: dict[str, str] = {}
    for backend in args.backend or [None]:
        if backend is not None:
            missing = [op for op in EP_LOCAL_OPERATORS if not registry.backends()[backend].implements(get_operator(op).hook)]
            if missing:
                skipped[backend] = f"does not implement {', '.join(missing)}"
                console.print(f"EP cases not run on {backend}: it {skipped[backend]}")
                continue
        console.print(f"  EP across {args.ep_world_size} ranks" + (f" on {backend}" if backend else ""), style="dim")
        records += run_ep_bench(args.ep_world_size, backend, repeats=max(3, args.repeats // 2))
    return records, skipped


def run(args: argparse.Namespace) -> int:
    from hal.bench.runner import bench, save_results

    # Dispatch and combine are multi-process: they run when --op selects them (ep_*) or by default.
    ep_requested = not args.op or any(fnmatch.fnmatch(name, p) for p in args.op for name in ("ep_dispatch", "ep_combine"))
    try:
        cases, mode = selected_cases(args)
    except HalError:
        if not ep_requested:
            raise
        cases, mode = [], "ep"
    backends = resolve_backends(args.backend, "hal bench")
    console = Console(stderr=args.json)
    console.print(f"Benchmark ({mode}): {len(cases)} cases, backends {', '.join(backends)}" + ("" if args.no_peers else " + peers"))
    report = bench(backends, cases, with_peers=not args.no_peers, repeats=args.repeats, progress=lambda r: console.print(f"  {r['case']}", style="dim"))
    if ep_requested:
        report["ep"], report["ep_skipped"] = _bench_ep(args, console)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for device, peaks in report["peaks"].items():
            console.print(
                f"Measured peaks on {device}: copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
                f"{peaks['matmul_dtype']} matmul {peaks['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s"
            )
        table = Table(title="hal bench")
        for column in ("case", "contender", "median", "GB/s", "TFLOP/s", "% bound", "speedup vs others"):
            table.add_column(column, overflow="fold")
        for record in report["cases"]:
            for i, entry in enumerate(record["results"]):
                label = record["case"] if i == 0 else ""
                name = entry["name"] + (" [dim](peer)[/]" if entry["kind"] == "peer" else "")
                if "median_s" not in entry:
                    table.add_row(label, name, "-", "-", "-", "-", escape(entry["note"]))
                    continue
                gbps, tflops = _rate(entry)
                ratios = ", ".join(f"{escape(k)} {v:.2f}x" for k, v in entry["speedup_vs"].items())
                table.add_row(label, name, f"{entry['median_s'] * 1e3:.3f} ms", gbps, tflops, f"{100 * entry['fraction_of_bound']:.1f}", ratios)
        console.print(table)
        if report.get("ep"):
            ep_table = Table(title=f"Expert parallelism across {report['ep'][0]['world_size']} ranks (gloo)")
            for column in ("case", "backend", "MB/rank", "median", "MB/s per rank", "plain all_to_all", "ratio to all_to_all"):
                ep_table.add_column(column)
            for r in report["ep"]:
                ep_table.add_row(
                    r["case"], r["backend"], f"{r['bytes_per_rank'] / 1e6:.3f}", f"{r['median_s'] * 1e3:.3f} ms", f"{r['bytes_per_s_per_rank'] / 1e6:.1f}",
                    f"{r['all_to_all_median_s'] * 1e3:.3f} ms", f"{r['ratio_to_all_to_all']:.2f}",
                )
            console.print(ep_table)
    if args.save:
        path = save_results(report, args.save)
        console.print(f"Saved {path}")
    return 0
