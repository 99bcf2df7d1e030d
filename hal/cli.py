"""The ``hal`` command line.

``hal backends [--json | --features]``: discovered backends, availability (and why not), operators, selection.
``hal conformance [...]``: certify backends against the reference (see ``hal conformance -h``).
``hal bench [...]``: time backends and peers, fractions of measured peak (see ``hal bench -h``).
``hal new-backend NAME [--dir D]``: write a vendor plugin package to start from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import hal
from hal import cli_bench, cli_conformance
from hal.cli_console import console as make_console
from hal.report import backends_report
from hal.selection import honoured_variables, parse_chain


def _print_backends(report: dict[str, Any], console: Console) -> None:
    table = Table(title="Backends (entry-point group 'hal.backends')", show_lines=True)
    table.add_column("backend", overflow="fold")
    table.add_column("status", overflow="fold")
    table.add_column("operators", overflow="fold")
    for b in report["backends"]:
        if b["available"]:
            status = "[green]available[/]" + (" [yellow](simulated)[/]" if b["simulated"] else "")
        else:
            status = f"[red]unavailable[/]: {escape(b['reason'])}"
        if b["device"]:
            status += f"\ndevice: {escape(b['device'])}"
        name = f"[bold]{escape(b['name'])}[/] (priority {b['priority']})\n{escape(b['description'])}\n[dim]{escape(b['source'])}[/]"
        lines = []
        for op in b["operators"]:
            lacking = sorted(set(report["operators"][op]["features"]) - set(b["features"].get(op, ())))
            lines.append(op + (f" [yellow](lacks {escape(', '.join(lacking))})[/]" if lacking else ""))
        operators = "\n".join(lines) or "(none)"
        if b["not_implemented_yet"]:
            operators += f"\n[dim]{len(b['not_implemented_yet'])} declared, not implemented yet[/]"
        if b["canary"] is not None and b["canary"]["passed"]:
            status += f"\n[dim]canary passed: {b['canary']['cases']} cases in a child process[/]"
        if b["certification"]:
            states = Counter(state.split(" (")[0] for state in b["certification"].values())
            status += "\n" + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) + " (hal certify)"
        table.add_row(name, status, operators)
    console.print(table)

    for device_type, per_op in report["selection"].items():
        chosen = Table(title=f"Selection for {device_type} tensors")
        chosen.add_column("operator", overflow="fold")
        chosen.add_column("backend")
        chosen.add_column("why", overflow="fold")
        for op_name, pick in per_op.items():
            if pick["backend"] is None:
                chosen.add_row(op_name, "[red]none[/]", escape(pick["error"]))
            else:
                chosen.add_row(op_name, pick["backend"], escape(pick["reason"]))
        console.print(chosen)
    ep = report["ep_transport"]
    console.print("EP transport (hal.ep.Buffer): " + escape("; ".join(f"{where}: {what}" for where, what in ep["rule"].items())) + f" [dim]({escape(ep['shm'])}; {escape(ep.get('ipc', ''))})[/]")
    if report["environment"]:
        console.print("Selection variables honoured: " + escape(", ".join(f"{k}={v}" for k, v in report["environment"].items())))
    for var, ignored in report["ignored_environment"].items():
        console.print(f"[yellow]Ignored:[/] {escape(var)}={escape(ignored['value'])} names no operator; did you mean {escape(ignored['did_you_mean'])}?")


def _print_features(report: dict[str, Any], console: Console) -> None:
    """Operator feature x backend: which optional parts of each contract every backend serves."""
    names = [b["name"] for b in report["backends"] if b["operators"]]
    by_name = {b["name"]: b for b in report["backends"]}
    table = Table(title="Contract features per backend (v = served, - = not, blank = operator not implemented)")
    table.add_column("operator / feature", overflow="fold")
    for name in names:
        table.add_column(name, justify="center")
    for op, spec in report["operators"].items():
        for feature, summary in spec["features"].items():
            cells = []
            for name in names:
                backend = by_name[name]
                if op not in backend["operators"]:
                    cells.append("")
                else:
                    cells.append("[green]v[/]" if feature in backend["features"].get(op, ()) else "[red]-[/]")
            table.add_row(f"{op} v{spec['version']} / {feature}\n[dim]{escape(summary)}[/]", *cells)
    console.print(table)


def _check_environment() -> None:
    """A misspelt backend in a selection variable is a configuration error, not a table row."""
    for var, value in honoured_variables().items():
        parse_chain(value, source=f"{var}={value}")


def _cmd_backends(args: argparse.Namespace) -> int:
    _check_environment()
    report = backends_report()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.features:
        _print_features(report, make_console())
    else:
        _print_backends(report, make_console())
    return 0


def _cmd_capabilities(args: argparse.Namespace) -> int:
    from hal.capabilities import render

    text = render()
    if args.check is not None:
        current = args.check.read_text() if args.check.exists() else ""
        if current != text:
            make_console(stderr=True).print(f"[red]{escape(str(args.check))} is stale:[/] run hal capabilities --write {escape(str(args.check))}")
            return 1
        return 0
    if args.write is not None:
        args.write.write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


def _cmd_new_backend(args: argparse.Namespace) -> int:
    from hal.scaffold import write_backend_package

    directory = args.dir or Path(f"hal-{args.name.replace('_', '-')}")
    try:
        written = write_backend_package(args.name, directory)
    except (ValueError, FileExistsError) as exc:
        make_console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    console = make_console()
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"Next: pip install -e {directory} && hal backends && {directory}/ci/conformance.sh")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hal", description="unihal: DeepSeek-class LLM kernels on any accelerator.")
    parser.add_argument("--version", action="version", version=f"unihal {hal.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    backends = commands.add_parser("backends", help="list backends, their availability, operators and the selection")
    backends.add_argument("--json", action="store_true", help="print the report as JSON")
    backends.add_argument("--features", action="store_true", help="print which optional contract features each backend serves")
    backends.set_defaults(run=_cmd_backends)
    capabilities = commands.add_parser("capabilities", help="print docs/capabilities.md (operators x backends x features) from the code")
    capabilities.add_argument("--write", type=Path, metavar="FILE", help="write it to FILE")
    capabilities.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE differs from what the code generates")
    capabilities.set_defaults(run=_cmd_capabilities)
    cli_conformance.add_parser(commands)
    cli_bench.add_parser(commands)
    scaffold = commands.add_parser("new-backend", help="write a vendor plugin package to start a new backend from")
    scaffold.add_argument("name", help="backend name (lower-case identifier): the HAL_BACKEND value")
    scaffold.add_argument("--dir", type=Path, help="where to write it (default: ./hal-NAME)")
    scaffold.set_defaults(run=_cmd_new_backend)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_progress_logs()
    try:
        return args.run(args)
    except hal.HalError as exc:
        make_console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    except BrokenPipeError:
        # The reader went away (`hal backends --json | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _show_progress_logs() -> None:
    """Show unihal's info messages (a canary being run, a fallback taken) on stderr."""
    logger = logging.getLogger("hal")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a captured or replaced stream included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except (ValueError, OSError):  # a closed stream: the message has nowhere to go
            pass


if __name__ == "__main__":
    sys.exit(main())
