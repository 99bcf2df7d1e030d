"""``hal conformance``: run the conformance catalogue on backends and print/write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hal import registry
from hal.cli_cases import add_case_filters, resolve_backends, selected_cases

_STYLE = {"pass": "green", "fail": "red", "error": "dark_orange", "timeout": "magenta", "crash": "bold red", "unsupported": "dim"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "conformance",
        help="certify backends against the Hopper-semantics reference",
        description="Run the conformance catalogue on each backend; exit code 1 if any case does not pass.",
    )
    parser.add_argument("--backend", action="append", default=[], help="backend to certify (repeatable; default: every available backend)")
    add_case_filters(parser)
    parser.add_argument("--report", type=Path, metavar="DIR", help="write report.json, report.md and report.html into DIR")
    parser.add_argument("--isolate", action="store_true", help="run each backend's cases in a child process (survives crashes, kills hangs)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case (default 300)")
    parser.add_argument("--golden", type=Path, metavar="DIR", help="judge against goldens recorded in DIR (only the recorded cases run)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--require-all", action="store_true", help="fail when a backend does not implement an operator (default: report it as unsupported)")
    parser.set_defaults(run=run)
    actions = parser.add_subparsers(dest="action", metavar="{record}")
    recorder = actions.add_parser(
        "record", help="record golden vectors from one backend", description="Run cases on one backend and save inputs and outputs (safetensors + manifest.json with sha256 and versions)."
    )
    recorder.add_argument("--backend", required=True, help="backend whose outputs become the goldens")
    recorder.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    add_case_filters(recorder)
    recorder.set_defaults(run=run_record)


def run_record(args: argparse.Namespace) -> int:
    from hal.conformance.golden import record

    cases, _ = selected_cases(args)
    (backend,) = resolve_backends([args.backend], "hal conformance record")
    manifest = record(backend, cases, args.out)
    Console().print(f"Recorded {len(cases)} case(s) from {backend} into {manifest.parent} ({manifest.name})")
    return 0


def run(args: argparse.Namespace) -> int:
    from hal.conformance.report import summarize, write_reports
    from hal.conformance.runner import run_backend

    console = Console()
    recorded = None
    if args.golden is not None:
        from hal.conformance.golden import load_goldens

        recorded = set(load_goldens(args.golden)[1])
    cases, mode = selected_cases(args, recorded=recorded)
    if recorded is not None:
        mode = f"golden {args.golden}"
    if args.list:
        for case in cases:
            console.print(case.id)
        return 0
    backends = resolve_backends(args.backend, "hal conformance")
    console.print(f"Conformance ({mode}): {len(cases)} cases x {len(backends)} backend(s): {', '.join(backends)}")
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=len(cases) * len(backends))
        for backend in backends:
            progress.update(task, description=f"[bold]{backend}[/]")
            results += run_backend(
                backend, cases, timeout=args.timeout, isolate=args.isolate, golden_dir=args.golden, progress=lambda r: progress.advance(task)
            )

    table = Table(title=f"Conformance matrix ({mode})")
    table.add_column("case", overflow="fold")
    for backend in backends:
        table.add_column(backend, overflow="fold")
    by_key = {(r.backend, r.case_id): r for r in results}
    for case in cases:
        cells = []
        for backend in backends:
            r = by_key[(backend, case.id)]
            worst = r.worst()
            metric = f" {worst.metric}={worst.value:.2g}/{worst.threshold:g}" if worst and r.status in ("pass", "fail") else ""
            cells.append(f"[{_STYLE[r.status]}]{r.status}[/]{escape(metric)}" + (f"\n[dim]{escape(r.reason)}[/]" if r.reason else ""))
        table.add_row(case.id, *cells)
    console.print(table)
    for backend, counts in summarize(results).items():
        failed = counts["total"] - counts["pass"] - (0 if args.require_all else counts["unsupported"])
        style = "green" if failed == 0 else "red"
        label = backend + (" (simulated, not a hardware pass)" if registry.backends()[backend].availability().simulated else "")
        others = ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("pass", "total") and v)
        console.print(f"[{style}]{label}: {counts['pass']}/{counts['total']} passed[/]" + (f" ({others})" if others else ""))
    if args.report:
        paths = write_reports(results, args.report, mode=mode)
        console.print("Reports: " + ", ".join(str(p) for p in paths.values()))
    accepted = {"pass"} if args.require_all else {"pass", "unsupported"}
    return 0 if all(r.status in accepted for r in results) else 1
