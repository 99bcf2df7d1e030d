"""What ``hal conformance``, ``hal conformance record`` and ``hal bench`` share: the case filters
and the backends a run covers."""

from __future__ import annotations

import argparse

import torch

from hal import registry
from hal.errors import BackendUnavailableError, HalError, UnknownBackendError

__all__ = ["add_case_filters", "selected_cases", "resolve_backends"]


def add_case_filters(parser: argparse.ArgumentParser) -> None:
    """--op, --case and the --quick/--full tier (default: quick without a GPU, full with one)."""
    parser.add_argument("--op", action="append", default=[], help="only this operator (repeatable)")
    parser.add_argument("--case", action="append", default=[], metavar="PATTERN", help="only case ids or names matching this shell pattern (repeatable)")
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="quick", action="store_true", default=None, help="the small subset for CPUs and interpreters (default without a GPU)")
    tier.add_argument("--full", dest="quick", action="store_false", help="every case, DeepSeek-V3 shapes included (default with a GPU)")


def selected_cases(args: argparse.Namespace, *, recorded: set[str] | None = None) -> tuple[list, str]:
    """The cases the filters select and the tier's name; ``recorded`` restricts to golden case ids (any tier)."""
    from hal.conformance.catalogue import select_cases

    quick = args.quick if args.quick is not None else not torch.cuda.is_available()
    if recorded is not None:
        cases = [c for c in select_cases(quick=False, ops=args.op, patterns=args.case) if c.id in recorded]
    else:
        cases = select_cases(quick=quick, ops=args.op, patterns=args.case)
    if not cases:
        raise HalError("no conformance case matches the filters (see `hal conformance --list`)")
    return cases, "quick" if quick else "full"


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
