"""``hal conformance``: run the conformance catalogue on backends and print/write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hal import registry
from hal.errors import BackendUnavailableError, UnknownBackendError

_STYLE = {"pass": "green", "fail": "red", "error": "dark_orange", "timeout": "magenta", "crash": "bold red", "unsupported": "dim"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "conformance",
        help="certify backends against the Hopper-semantics reference",
        description="Run the conformance catalogue on each backend; exit code 1 if any case does not pass.",
    )
    parser.add_argument("--backend", action="append", default=[], help="backend to certify (repeatable; default: every available backend)")
    parser.add_argument("--op", action="append", default=[], help="only this operator (repeatable)")
    parser.add_argument("--case", action="append", default=[], metavar="PATTERN", help="only case ids or names matching this shell pattern (repeatable)")
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="quick", action="store_true", default=None, help="the small subset for CPUs and interpreters")
    tier.add_argument("--full", dest="quick", action="store_false", help="every case, DeepSeek-V3 shapes included")
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
    recorder.add_argument("--op", action="append", default=[], help="only this operator (repeatable)")
    recorder.add_argument("--case", action="append", default=[], metavar="PATTERN", help="only cases matching this shell pattern")
    recorder_tier = recorder.add_mutually_exclusive_group()
    recorder_tier.add_argument("--quick", dest="quick", action="store_true", default=None)
    recorder_tier.add_argument("--full", dest="quick", action="store_false")
    recorder.set_defaults(run=run_record)


def run_record(args: argparse.Namespace) -> int:
    from hal.conformance.catalogue import select_cases
    from hal.conformance.golden import record

    quick = args.quick if args.quick is not None else not torch.cuda.is_available()
    cases = select_cases(quick=quick, ops=args.op, patterns=args.case)
    if not cases:
        Console(stderr=True).print("[red]no case matches the filters[/]")
        return 2
    (backend,) = resolve_backends([args.backend], "hal conformance record")
    manifest = record(backend, cases, args.out)
    Console().print(f"Recorded {len(cases)} case(s) from {backend} into {manifest.parent} ({manifest.name})")
    return 0


def resolve_backends(requested: list[str], command: str) -> list[str]:
    """The backends a command runs on: those named (each must be known and available), else every available one."""
    known = registry.backends()
    if not requested:
        return [name for name, b in sorted(known.items(), key=lambda kv: (-kv[1].priority, kv[0])) if b.available]
    for name in requested:
        if name not in known:
            raise UnknownBackendError(f"{command}: unknown backend {name!r}; known backends: {', '.join(sorted(known))}")
        if not known[name].available:
            raise BackendUnavailableError(f"{command}: backend {name!r} is unavailable: {known[name].availability().reason}")
    return requested


def run(args: argparse.Namespace) -> int:
    from hal.conformance.catalogue import select_cases
    from hal.conformance.report import summarize, write_reports
    from hal.conformance.runner import run_backend

    console = Console()
    quick = args.quick if args.quick is not None else not torch.cuda.is_available()
    mode = "quick" if quick else "full"
    cases = select_cases(quick=quick, ops=args.op, patterns=args.case)
    if args.golden is not None:
        from hal.conformance.golden import load_goldens

        recorded = load_goldens(args.golden)[1]
        cases = [c for c in select_cases(quick=False, ops=args.op, patterns=args.case) if c.id in recorded]
        mode = f"golden {args.golden}"
    if args.list:
        for case in cases:
            console.print(case.id)
        return 0
    if not cases:
        console.print("[red]no case matches the filters[/]")
        return 2
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
        console.print(f"[{style}]{label}: {counts['pass']}/{counts['total']} passed[/]" + (f" ({', '.join(f'{v} {k}' for k, v in counts.items() if k not in ('pass', 'total') and v)})" if failed else ""))
    if args.report:
        paths = write_reports(results, args.report, mode=mode)
        console.print("Reports: " + ", ".join(str(p) for p in paths.values()))
    accepted = {"pass"} if args.require_all else {"pass", "unsupported"}
    return 0 if all(r.status in accepted for r in results) else 1
