"""``hal conformance``: run the conformance catalogue on backends and print/write the results."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hal import registry
from hal.cli_cases import add_case_filters, resolve_backends, selected_cases
from hal.cli_console import console as make_console

_STYLE = {"pass": "green", "fail": "red", "error": "dark_orange", "timeout": "magenta", "crash": "bold red", "unsupported": "dim"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "conformance",
        help="certify backends against the Hopper-semantics reference",
        description="Run the conformance catalogue on each backend; exit code 1 if any case does not pass.",
    )
    parser.add_argument(
        "--backend", action="append", default=[],
        help="backend to certify (repeatable; default: every available backend, the Triton ones simulated on a machine without a GPU)",
    )
    add_case_filters(parser)
    parser.add_argument("--report", type=Path, metavar="DIR", help="write report.json, report.md and report.html into DIR")
    parser.add_argument("--isolate", action="store_true", help="run each backend's cases in a child process (survives crashes, kills hangs)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case (default 300)")
    parser.add_argument("--golden", type=Path, metavar="DIR", help="judge against goldens recorded in DIR (only the recorded cases run)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--matrix", action="store_true", help="print every case x backend (default: only the cases that did not pass)")
    parser.add_argument("--require-all", action="store_true", help="fail when a backend does not implement an operator (default: report it as unsupported)")
    parser.add_argument("--no-certify", dest="certify", action="store_false", help="do not write certificates (default: one per backend into the cache)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="also export the certificates into DIR")
    parser.set_defaults(run=run, certify=True)
    certify = commands.add_parser(
        "certify", help="run the conformance catalogue and write each backend's certificate (what a vendor publishes)",
        description="hal conformance, writing certificates: the cache keeps them for HAL_REQUIRE_CERTIFIED=1 selection; --out exports them.",
    )
    certify.add_argument("--backend", action="append", default=[], help="backend to certify (repeatable; default: every available one)")
    add_case_filters(certify)
    certify.add_argument("--report", type=Path, metavar="DIR", help="write report.json, report.md and report.html into DIR")
    certify.add_argument("--isolate", action="store_true", help="run each backend's cases in a child process")
    certify.add_argument("--timeout", type=float, default=300.0, help="seconds per case (default 300)")
    certify.add_argument("--out", type=Path, metavar="DIR", help="also export the certificates into DIR")
    certify.set_defaults(run=run, certify=True, golden=None, list=False, matrix=False, require_all=False)
    verify = commands.add_parser("verify", help="check a certificate's hash and, on matching hardware, re-run a sample of its cases")
    verify.add_argument("certificate", type=Path, help="a certificate file (from hal certify --out, or $HAL_CACHE_DIR/certificates)")
    verify.add_argument("--sample", type=int, default=6, help="cases to re-run when the backend and device match (default 6; 0: hash only)")
    verify.set_defaults(run=run_verify)
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
    make_console().print(f"Recorded {len(cases)} case(s) from {backend} into {manifest.parent} ({manifest.name})")
    return 0


def _simulate_triton_backends(console: Console) -> None:
    """With no GPU but triton installed, certify the Triton backends in the CPU interpreter.

    Only for a run that names no backend; the variables must be set before discovery, because
    each Triton backend detects its target when its plugin module is imported."""
    import importlib.util
    import os

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET"):
        return
    if "hal.backends.triton.backend" in sys.modules:
        return  # too late: the Triton backends have detected their target (they are reported as not run)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HAL_ROCM_SIMULATE_ARCH", "gfx942")
    console.print(
        "No GPU here: the Triton backends run [yellow]simulated[/] in Triton's CPU interpreter "
        f"(TRITON_INTERPRET=1, rocm as {os.environ['HAL_ROCM_SIMULATE_ARCH']}): their numerics are certified, never as a hardware pass."
    )


def _skipped_backends() -> list[tuple[str, str]]:
    return [(name, b.availability().reason) for name, b in sorted(registry.backends().items()) if not b.available]


def _matrix(results: list, cases: list, backends: list[str], mode: str, *, everything: bool) -> Table | None:
    by_key = {(r.backend, r.case_id): r for r in results}
    table = Table(title=f"Conformance matrix ({mode})" if everything else "Cases that did not pass")
    table.add_column("case", overflow="fold")
    for backend in backends:
        table.add_column(backend, overflow="fold")
    rows = 0
    for case in cases:
        row = [by_key[(backend, case.id)] for backend in backends]
        if not everything and all(r.status in ("pass", "unsupported") for r in row):
            continue
        cells = []
        for r in row:
            worst = r.worst()
            metric = f" {worst.metric}={worst.value:.2g}/{worst.threshold:g}" if worst and r.status in ("pass", "fail") else ""
            cells.append(f"[{_STYLE[r.status]}]{r.status}[/]{escape(metric)}" + (f"\n[dim]{escape(r.reason)}[/]" if r.reason else ""))
        table.add_row(case.id, *cells)
        rows += 1
    return table if rows else None


def _summary(results: list, backends: list[str], skipped: list[tuple[str, str]], require_all: bool, golden: bool) -> Table:
    from hal.conformance.report import summarize

    table = Table(title="Conformance summary", show_lines=False)
    table.add_column("backend", no_wrap=True, min_width=9)
    table.add_column("device", overflow="ellipsis", no_wrap=True, max_width=22)
    for column in ("passed", "failed", "absent"):  # absent: operators the backend does not implement
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("verdict", overflow="fold", min_width=10)
    counts_by_backend = summarize(results)
    for backend in backends:
        counts = counts_by_backend.get(backend, {"pass": 0, "total": 0, "unsupported": 0})
        availability = registry.backends()[backend].availability()
        not_passed = counts["total"] - counts["pass"] - counts.get("unsupported", 0)
        failed = not_passed + (counts.get("unsupported", 0) if require_all else 0)
        verdict = "[green]certified[/]" if failed == 0 else "[red]FAILED[/]"
        if backend == "reference" and not golden:
            verdict = "[dim]self-check[/]" if failed == 0 else verdict
        elif availability.simulated and failed == 0:
            verdict = "[yellow]simulated[/]"
        implemented = counts["total"] - counts.get("unsupported", 0)
        table.add_row(backend, escape(availability.device), f"{counts['pass']}/{implemented}", str(not_passed), str(counts.get("unsupported", 0)), verdict)
    for name, _ in skipped:  # the reasons are printed before the run
        table.add_row(f"[dim]{escape(name)}[/]", "", "-", "-", "-", "[dim]not run (above)[/]")
    table.caption = "self-check: the reference is the contract; simulated: numerics certified in an interpreter, not a hardware pass"
    return table


def run(args: argparse.Namespace) -> int:
    from hal.conformance.report import write_reports
    from hal.conformance.runner import run_backend

    console = make_console()
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
    if not args.backend:
        _simulate_triton_backends(console)
    backends = resolve_backends(args.backend, "hal conformance")
    skipped = [] if args.backend else _skipped_backends()
    console.print(f"Conformance ({mode}): {len(cases)} cases x {len(backends)} backend(s): {', '.join(backends)}")
    for name, reason in skipped:
        console.print(f"[dim]not run: {escape(name)}: {escape(reason)}[/]")
    results = []
    # The Triton interpreter computes NaN-poisoned cases with numpy, which warns on every one.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("[dim]{task.fields[case]}"),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("", total=len(cases) * len(backends), case="")
        for backend in backends:
            progress.update(task, description=f"[bold]{backend}[/]")
            results += run_backend(
                backend, cases, timeout=args.timeout, isolate=args.isolate, golden_dir=args.golden,
                progress=lambda r: progress.update(task, advance=1, case=r.case_id),
            )
    matrix = _matrix(results, cases, backends, mode, everything=args.matrix)
    if matrix is not None:
        console.print(matrix)
    console.print(_summary(results, backends, skipped, args.require_all, args.golden is not None))
    certificates = _write_certificates(console, results, backends, mode, args) if args.certify and args.golden is None else {}
    if args.report:
        paths = write_reports(results, args.report, mode=mode, certificates=certificates)
        console.print("Reports: " + ", ".join(str(p) for p in paths.values()))
    elif not args.matrix:
        console.print("[dim]--matrix prints every case; --report DIR writes JSON, Markdown and HTML reports.[/]")
    accepted = {"pass"} if args.require_all else {"pass", "unsupported"}
    return 0 if all(r.status in accepted for r in results) else 1


def _write_certificates(console: Console, results: list, backends: list[str], mode: str, args: argparse.Namespace) -> dict[str, str]:
    """One certificate per backend into the cache (and ``--out``); returns backend -> sha256."""
    from hal import certificate

    written = {}
    for backend in backends:
        cert = certificate.build(backend, results, mode)
        path = certificate.save(cert)
        if args.out is not None:
            path = certificate.save(cert, args.out)
        ops = cert.data["operators"]
        certified = sum(1 for entry in ops.values() if entry["certified"])
        console.print(f"certificate [bold]{escape(backend)}[/]: {certified}/{len(ops)} operators certified, sha256 {cert.sha256[:16]}… -> {escape(str(path))}")
        written[backend] = cert.sha256
    return written


def run_verify(args: argparse.Namespace) -> int:
    """Check the hash; when this machine has the same backend and identity, re-run a sample of the certificate's cases."""
    import random

    from hal import certificate, registry
    from hal.conformance.catalogue import all_cases
    from hal.conformance.runner import run_backend

    console = make_console()
    try:
        cert = certificate.load(args.certificate)
    except certificate.CertificateError as exc:
        console.print(f"[red]rejected:[/] {escape(str(exc))}")
        return 1
    data = cert.data
    ops = data["operators"]
    console.print(f"sha256 {cert.sha256} matches its content: backend {escape(cert.backend)}, tier {data['tier']}, "
                  f"{sum(e['certified'] for e in ops.values())}/{len(ops)} operators certified, device {escape(str(data['backend'].get('device')))}")
    backend = registry.get_backend(cert.backend)
    if args.sample <= 0:
        return 0
    if backend is None or not backend.available:
        console.print(f"[yellow]not re-run:[/] backend {escape(cert.backend)} is not available here")
        return 0
    now = certificate.identity(backend)
    changed = sorted(k for k in set(now) | set(data["backend"]) if now.get(k) != data["backend"].get(k))
    if changed:
        console.print(f"[yellow]not re-run:[/] this machine differs in {', '.join(changed)}")
        return 0
    certified_cases = [case_id for entry in ops.values() if entry["certified"] for case_id in entry["cases"]]
    by_id = {case.id: case for case in all_cases()}
    chosen = random.Random(cert.sha256).sample(sorted(c for c in certified_cases if c in by_id), min(args.sample, len(certified_cases)))
    results = run_backend(cert.backend, [by_id[c] for c in chosen])
    bad = [r for r in results if r.status != "pass"]
    for r in results:
        console.print(f"  {'[green]pass[/]' if r.passed else '[red]' + r.status + '[/]'} {escape(r.case_id)}")
    if bad:
        console.print(f"[red]the certificate does not hold here:[/] {len(bad)} of {len(results)} re-run cases did not pass")
        return 1
    console.print(f"[green]verified:[/] {len(results)} re-run cases pass on this machine")
    return 0
