"""``hal bench``: time backends and peers on the conformance cases; fractions of the bound and ratios."""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hal.cli_cases import add_case_filters, resolve_backends, selected_cases
from hal.cli_console import console as make_console
from hal.errors import HalError

if TYPE_CHECKING:
    from hal.bench.memory import MemoryBudget

DEFAULT_RESULTS = Path("bench/results")

# What a rank runs locally in dispatch and combine; a backend must implement them to be timed there.
EP_LOCAL_OPERATORS = ("ep_dispatch_layout", "ep_pack", "ep_unpack", "ep_combine_reduce")
# Resident memory of one spawned EP rank (torch, gloo, the default 256 x 2048 tokens): ~0.4 GiB measured, with headroom.
EP_RANK_BYTES = 768 * 2**20


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="time operators on backends and installed peers",
        description=(
            "Median time per case, achieved bandwidth and FLOP rate, fraction of the bound this machine's measured peaks imply, "
            "ratio to every other contender. --op and --case select every case, the multi-process EP ones included. "
            "With --save, the results JSON and a PNG plot of the fractions are written side by side."
        ),
    )
    parser.add_argument("--backend", action="append", default=[], help="backend to time (repeatable; default: every available backend)")
    add_case_filters(parser)
    parser.add_argument("--no-peers", action="store_true", help="time backends only")
    parser.add_argument(
        "--hot-cache", action="store_true",
        help="do not evict the caches before each timed run (inputs that fit the last-level cache are then read from it, not from memory)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per contender (median reported; at least 7 unless fewer are asked for)")
    parser.add_argument("--ep-world-size", type=int, default=4, help="gloo ranks spawned for the multi-process EP cases (ep_dispatch/*, ep_combine/*, ...)")
    parser.add_argument(
        "--memory-budget", type=_budget, default=None, metavar="SIZE",
        help="skip cases whose estimated peak memory exceeds SIZE: '8G', '512M', '2.5' (GiB) or '50%%' of available memory (default 70%%)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", nargs="?", const=DEFAULT_RESULTS, type=Path, metavar="DIR", help=f"write results JSON and plot PNG under DIR (default {DEFAULT_RESULTS})")
    parser.set_defaults(run=run)


def _budget(text: str) -> MemoryBudget:
    from hal.bench.memory import MemoryBudget, parse_budget

    try:
        limit, fraction = parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return MemoryBudget(limit_bytes=limit) if limit is not None else MemoryBudget(fraction=fraction)


def _ep_selected(args: argparse.Namespace) -> list[str]:
    """EP benchmark cases (``ep_dispatch/bf16``, ...) that --op (matched against the part before
    the slash) and --case (matched against the id or the part after it) select."""
    from hal.ep.bench import CASES

    selected = []
    for case_id in CASES:
        op, name = case_id.split("/", 1)
        if args.op and not any(fnmatch.fnmatch(op, p) for p in args.op):
            continue
        if args.case and not any(fnmatch.fnmatch(case_id, p) or fnmatch.fnmatch(name, p) for p in args.case):
            continue
        selected.append(case_id)
    return selected


def _bench_ep(args: argparse.Namespace, console: Console, selected: list[str], budget: MemoryBudget) -> tuple[list[dict], dict[str, str]]:
    """The selected multi-process EP cases: on each named backend (every rank runs on it), else as ranks select.
    Only the selected cases are run where ``hal.ep.bench.run`` takes a ``cases`` argument; otherwise
    it runs all of them in one spawn and the unselected ones are dropped from the results."""
    from hal import registry
    from hal.bench.memory import human
    from hal.ep.bench import run as run_ep_bench
    from hal.operator import get_operator

    records: list[dict] = []
    skipped: dict[str, str] = {}
    needed, allowed = args.ep_world_size * EP_RANK_BYTES, budget.bytes_now("cpu")
    for backend in args.backend or [None]:
        label = backend or "auto"
        if needed > allowed:
            skipped[label] = f"{args.ep_world_size} ranks need ~{human(needed)}, over the memory budget ({budget.describe()}{'' if budget.limit_bytes is not None else f': {human(allowed)} now'})"
            console.print(f"EP cases not run on {label}: {skipped[label]}")
            continue
        if backend is not None:
            missing = [op for op in EP_LOCAL_OPERATORS if not registry.backends()[backend].implements(get_operator(op).hook)]
            if missing:
                skipped[backend] = f"does not implement {', '.join(missing)}"
                console.print(f"EP cases not run on {backend}: it {skipped[backend]}")
                continue
        console.print(f"  EP across {args.ep_world_size} ranks" + (f" on {backend}" if backend else ""), style="dim")
        only = {"cases": tuple(selected)} if "cases" in inspect.signature(run_ep_bench).parameters else {}
        records += [r for r in run_ep_bench(args.ep_world_size, backend, repeats=max(3, args.repeats // 2), **only) if r["case"] in selected]
    return records, skipped


def _peaks_line(device: str, peaks: dict[str, Any]) -> str:
    copy = peaks["copy_bytes_per_s"]
    rates = ", ".join(
        f"{name} matmul {r['median'] / 1e9:.0f} GFLOP/s [{r['low'] / 1e9:.0f}-{r['high'] / 1e9:.0f}]" for name, r in peaks["matmul_flops_per_s"].items()
    )
    copy_text = f"copy {copy['median'] / 1e9:.1f} GB/s [{copy['low'] / 1e9:.1f}-{copy['high'] / 1e9:.1f}]"
    return f"Measured peaks on {device} (median [min-max] of {copy['repeats']}): {copy_text}, {rates}"


def _contender_label(entry: dict[str, Any]) -> str:
    if entry["kind"] != "peer":
        return escape(entry["name"])
    formulation = f" [dim]{escape(entry['formulation'])}[/]" if entry.get("formulation") else ""
    return f"{escape(entry['name'])} [dim](peer)[/]{formulation}"


_SHORT_BOUND = {"matmul bfloat16": "bf16 mm", "matmul float32": "fp32 mm"}


def _print_cases(report: dict[str, Any], console: Console) -> None:
    table = Table(title="hal bench")
    for column in ("case", "contender", "median", "GB/s", "GFLOP/s", "% bound", "bound", "vs torch", "speedup vs others"):
        table.add_column(column, overflow="fold")
    for record in report["cases"]:
        if "skipped" in record:
            table.add_row(record["case"], "-", "-", "-", "-", "-", "-", "-", f"[yellow]skipped:[/] {escape(record['skipped'])}")
            continue
        for i, entry in enumerate(record["results"]):
            label = record["case"] if i == 0 else ""
            if "median_s" not in entry:
                table.add_row(label, _contender_label(entry), "-", "-", "-", "-", "-", "-", escape(entry["note"]))
                continue
            ratios = ", ".join(f"{escape(k)} {v:.2f}x" for k, v in entry["speedup_vs"].items())
            vs_torch = f"{entry['ratio_to_peer']:.2f}x" if entry.get("ratio_to_peer") and entry["name"] != "torch" else "-"
            table.add_row(
                label, _contender_label(entry), f"{entry['median_s'] * 1e3:.3f} ms", f"{entry['bytes_per_s'] / 1e9:.2f}", f"{entry['flops_per_s'] / 1e9:.1f}",
                f"{100 * entry['fraction_of_bound']:.1f}", _SHORT_BOUND.get(entry["bound"], entry["bound"]), vs_torch, ratios,
            )
    console.print(table)


def _print_ep(report: dict[str, Any], console: Console) -> None:
    ep_table = Table(title=f"Expert parallelism across {report['ep'][0]['world_size']} ranks (gloo)")
    for column in ("case", "backend", "MB/rank", "median", "MB/s per rank", "plain all_to_all", "ratio to all_to_all"):
        ep_table.add_column(column)
    for r in report["ep"]:
        ep_table.add_row(
            r["case"], r["backend"], f"{r['bytes_per_rank'] / 1e6:.3f}", f"{r['median_s'] * 1e3:.3f} ms", f"{r['bytes_per_s_per_rank'] / 1e6:.1f}",
            f"{r['all_to_all_median_s'] * 1e3:.3f} ms", f"{r['ratio_to_all_to_all']:.2f}",
        )
    console.print(ep_table)


def _save(report: dict[str, Any], directory: Path, console: Console) -> None:
    """The JSON, then the PNG beside it (same name); a missing matplotlib is said, not fatal."""
    from hal.bench.plot import PlotUnavailableError, write_plot
    from hal.bench.runner import save_results

    path = save_results(report, directory)
    console.print(f"Saved {path}")
    try:
        console.print(f"Plot {write_plot(report, path.with_suffix('.png'))}")
    except PlotUnavailableError as exc:
        console.print(f"[yellow]{escape(str(exc))}[/]")
    except ValueError as exc:
        console.print(f"No plot: {escape(str(exc))}")


def run(args: argparse.Namespace) -> int:
    from hal.bench.memory import MemoryBudget
    from hal.bench.runner import bench

    budget = args.memory_budget or MemoryBudget()
    ep_cases = _ep_selected(args)
    try:
        cases, mode = selected_cases(args)
    except HalError:
        if not ep_cases:
            raise
        cases, mode = [], "ep"
    backends = resolve_backends(args.backend, "hal bench")
    console = make_console(stderr=args.json)
    console.print(
        f"Benchmark ({mode}): {len(cases)} cases" + (f" + {len(ep_cases)} EP cases" if ep_cases else "")
        + f", backends {', '.join(backends)}" + ("" if args.no_peers else " + peers") + f"; memory budget {budget.describe()}"
    )
    report = bench(backends, cases, with_peers=not args.no_peers, repeats=args.repeats, budget=budget, hot_cache=args.hot_cache,
                   progress=lambda r: console.print(f"  {r['case']}" + (" [yellow]skipped[/]" if "skipped" in r else ""), style="dim"))
    if ep_cases:
        report["ep"], report["ep_skipped"] = _bench_ep(args, console, ep_cases, budget)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for device, peaks in report["peaks"].items():
            console.print(escape(_peaks_line(device, peaks)))
        for device, cache in report.get("caches", {}).items():
            size = f" (target {cache['bytes'] >> 20} MiB)" if "bytes" in cache else ""
            console.print(escape(f"Caches on {device}: {cache['policy']}{size}" + (f"; {cache['why']}" if "why" in cache else "")))
        if "timing" in report:
            console.print(escape(f"Timing: {report['timing']}"))
        load = report["load"]
        console.print(f"Load average (1 min): {load['start']['1min']:.2f} at start, {load['end']['1min']:.2f} at end, on {report['machine']['cores']} cores")
        if report["cases"]:
            _print_cases(report, console)
        if report.get("ep"):
            _print_ep(report, console)
    if args.save:
        _save(report, args.save, console)
    return 0
