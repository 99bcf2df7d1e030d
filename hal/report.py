"""What ``hal backends`` shows: every backend, its availability, its operators, and the selection."""

from __future__ import annotations

import os
from typing import Any

import torch

from hal import certificate, registry
from hal.errors import HalError
from hal.operator import OPERATORS
from hal.selection import honoured_variables, select, unknown_variables

__all__ = ["device_types_present", "backends_report"]


def device_types_present() -> list[str]:
    """Torch device types with a device on this machine (``cpu`` always)."""
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    return types


def _ep_transport() -> dict[str, Any]:
    from hal.ep.transport import plan  # noqa: PLC0415  (torch.distributed only when reporting)

    return plan()


def backends_report() -> dict[str, Any]:
    """A JSON-serialisable description of discovery and selection on this machine."""
    hooks = {op.hook: op.name for op in OPERATORS.values()}
    backends = []
    for backend in sorted(registry.backends().values(), key=lambda b: (-b.priority, b.name)):
        availability = backend.availability()
        info = backend.info
        backends.append(
            {
                "name": backend.name,
                "source": backend.source,
                "description": info.description if info else "",
                "priority": backend.priority,
                "device_types": list(info.device_types) if info and info.device_types is not None else None,
                "available": availability.available,
                "reason": availability.reason,
                "device": availability.device,
                "simulated": availability.simulated,
                "load_error": backend.load_error,
                "operators": [hooks[h] for h in backend.implemented_hooks() if h in hooks],
                # what hal certify proved for this backend on this machine (HAL_REQUIRE_CERTIFIED=1 reads it)
                "certification": {
                    hooks[h]: certificate.status(backend, hooks[h]) for h in backend.implemented_hooks() if h in hooks
                } if availability.available else {},
                "features": {
                    op.name: sorted(backend.features(op)) for op in OPERATORS.values() if op.features and backend.implements(op.hook)
                },
                "not_implemented_yet": [hooks[h] for h in backend.planned_hooks() if h in hooks],
                "canary": None if backend.verdict is None else {
                    "passed": backend.verdict.passed, "reason": backend.verdict.reason, "cases": len(backend.verdict.cases),
                    "seconds": round(backend.verdict.seconds, 2), "checked_at": backend.verdict.checked_at,
                },
            }
        )
    selection: dict[str, dict[str, dict[str, str]]] = {}
    for device_type in device_types_present():
        per_op = selection.setdefault(device_type, {})
        for op in OPERATORS.values():
            try:
                chosen = select(op, device_type)
                per_op[op.name] = {"backend": chosen.backend.name, "reason": chosen.reason}
            except HalError as exc:
                per_op[op.name] = {"backend": None, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "backends": backends,
        "operators": {
            op.name: {
                "family": op.family, "hook": op.hook, "summary": op.summary, "version": op.version,
                "features": {f.name: f.summary for f in op.features},
            }
            for op in OPERATORS.values()
        },
        "selection": selection,
        "ep_transport": _ep_transport(),
        "environment": honoured_variables(),
        "require_certified": certificate.require_certified(),
        "ignored_environment": {var: {"value": os.environ[var], "did_you_mean": closest} for var, closest in unknown_variables().items()},
    }
