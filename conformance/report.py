"""Conformance reports: ``report.json`` (machine-readable), ``report.md`` and a self-contained
``report.html`` (operator x case matrix per backend, coloured by status, details on hover)."""

from __future__ import annotations

import datetime
import html
import json
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import hal
from hal import registry
from hal.conformance.case import CaseResult
from hal.conformance.metrics import TOLERANCES
from hal.operator import OPERATORS

__all__ = ["environment", "summarize", "build_report", "write_reports", "STATUSES"]

STATUSES = ("pass", "fail", "error", "timeout", "crash", "unsupported")
_COLOURS = {"pass": "#2e9d4f", "fail": "#d64541", "error": "#e67e22", "timeout": "#8e44ad", "crash": "#34495e", "unsupported": "#9e9e9e"}


def environment() -> dict[str, Any]:
    """Where the run happened: host, versions, devices, and each backend's availability."""
    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    backends = {}
    for name, backend in sorted(registry.backends().items()):
        availability = backend.availability()
        backends[name] = {
            "available": availability.available, "device": availability.device, "simulated": availability.simulated, "reason": availability.reason,
            # Which optional parts of each implemented contract the backend declares (see hal.operator.Feature).
            "features": {op.name: sorted(backend.features(op)) for op in OPERATORS.values() if op.features and backend.implements(op.hook)},
        }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "unihal": hal.__version__,
        "gpus": devices,
        "backends": backends,
    }


def summarize(results: Sequence[CaseResult]) -> dict[str, dict[str, int]]:
    """Counts per backend and status."""
    summary: dict[str, dict[str, int]] = {}
    for backend in dict.fromkeys(r.backend for r in results):
        counts = Counter(r.status for r in results if r.backend == backend)
        summary[backend] = {status: counts.get(status, 0) for status in STATUSES} | {"total": sum(counts.values())}
    return summary


def build_report(results: Sequence[CaseResult], *, mode: str) -> dict[str, Any]:
    return {
        "environment": environment(),
        "mode": mode,
        "tolerances": {f"{op}.{out}": {"metric": t.metric, "threshold": t.threshold, "source": t.source} for (op, out), t in TOLERANCES.items()},
        "summary": summarize(results),
        "results": [r.to_json() for r in results],
    }


def _cell_text(result: CaseResult) -> str:
    worst = result.worst()
    if result.status == "pass" and worst is not None:
        return f"{worst.value:.1e}" if worst.value else "0"
    return result.status


def _markdown(report: dict[str, Any], results: Sequence[CaseResult]) -> str:
    env = report["environment"]
    lines = [
        "# unihal conformance report",
        "",
        f"{env['date']} on {env['host']} ({env['platform']}), torch {env['torch']}, unihal {env['unihal']}, mode {report['mode']}.",
        "",
        "| backend | device | " + " | ".join(STATUSES) + " | total |",
        "|---|---|" + "---|" * len(STATUSES) + "---|",
    ]
    devices = {r.backend: r.device for r in results}
    for backend, counts in report["summary"].items():
        simulated = " (simulated)" if env["backends"].get(backend, {}).get("simulated") else ""
        lines.append(f"| {backend} | {devices.get(backend, '')}{simulated} | " + " | ".join(str(counts[s]) for s in STATUSES) + f" | {counts['total']} |")
    feature_ops = {op.name: [f.name for f in op.features] for op in OPERATORS.values() if op.features}
    lines += ["", "Contract features per backend that ran (+ served, - not):", "", "| backend | " + " | ".join(feature_ops) + " |", "|---|" + "---|" * len(feature_ops)]
    for backend in report["summary"]:
        declared = env["backends"].get(backend, {}).get("features", {})
        cells = [
            " ".join(("+" if f in declared[op] else "-") + f for f in names) if op in declared else "not implemented"
            for op, names in feature_ops.items()
        ]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines += ["", "| backend | case | status | worst metric | detail |", "|---|---|---|---|---|"]
    for r in results:
        worst = r.worst()
        metric = f"{worst.output} {worst.metric} {worst.value:.3g} (< {worst.threshold:g})" if worst else ""
        lines.append(f"| {r.backend} | `{r.case_id}` | {r.status} | {metric} | {r.reason.replace('|', '/')} |")
    lines += ["", "Thresholds: " + "; ".join(f"{k}: {v['metric']} < {v['threshold']:g}" for k, v in report["tolerances"].items()), ""]
    return "\n".join(lines)


def _html(report: dict[str, Any], results: Sequence[CaseResult]) -> str:
    env = report["environment"]
    backends = list(report["summary"])
    cases = list(dict.fromkeys(r.case_id for r in results))
    by_key = {(r.backend, r.case_id): r for r in results}
    rows = []
    current_op = None
    for case_id in cases:
        op, name = case_id.split("/", 1)
        if op != current_op:
            rows.append(f'<tr class="op"><th colspan="{len(backends) + 1}">{html.escape(op)}</th></tr>')
            current_op = op
        cells = []
        for backend in backends:
            r = by_key.get((backend, case_id))
            if r is None:
                cells.append('<td class="none">-</td>')
                continue
            detail = "\n".join(
                [f"{r.status} in {r.seconds:.3f} s on {r.device}", r.reason]
                + [f"{m.output}: {m.metric} = {m.value:.3g} (threshold {m.threshold:g}) {'ok' if m.passed else 'FAIL'} {m.note}" for m in r.measurements]
            ).strip()
            cells.append(
                f'<td class="{r.status}" style="background:{_COLOURS[r.status]}" title="{html.escape(detail)}">{html.escape(_cell_text(r))}</td>'
            )
        rows.append(f"<tr><th class=\"case\">{html.escape(name)}</th>{''.join(cells)}</tr>")
    summary_rows = "".join(
        f"<tr><th>{html.escape(b)}</th>" + "".join(f'<td class="n">{c[s]}</td>' for s in STATUSES) + f'<td class="n">{c["total"]}</td></tr>'
        for b, c in report["summary"].items()
    )
    legend = " ".join(f'<span class="chip" style="background:{c}">{s}</span>' for s, c in _COLOURS.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>unihal conformance</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
td.pass, td.fail, td.error, td.timeout, td.crash, td.unsupported {{ color: #fff; text-align: center; font-family: monospace; min-width: 80px; }}
tr.op th {{ background: #eee; text-align: left; }}
th.case {{ text-align: left; font-weight: normal; font-family: monospace; }}
td.n {{ text-align: right; }}
.chip {{ color: #fff; padding: 2px 8px; border-radius: 4px; margin-right: 4px; }}
</style></head><body>
<h1>unihal conformance report</h1>
<p>{html.escape(env['date'])} on {html.escape(env['host'])} ({html.escape(env['platform'])}); torch {html.escape(env['torch'])}; unihal {html.escape(env['unihal'])}; mode {html.escape(report['mode'])}.</p>
<h2>Summary</h2>
<table id="summary"><tr><th>backend</th>{''.join(f'<th>{s}</th>' for s in STATUSES)}<th>total</th></tr>{summary_rows}</table>
<h2>Matrix</h2>
<p>{legend} Cells show the worst error metric of a passing case (hover for every measurement and the threshold).</p>
<table id="matrix"><tr><th>case</th>{''.join(f'<th>{html.escape(b)}</th>' for b in backends)}</tr>{''.join(rows)}</table>
</body></html>
"""


def write_reports(results: Sequence[CaseResult], directory: Path, *, mode: str) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(results, mode=mode)
    paths = {"json": directory / "report.json", "md": directory / "report.md", "html": directory / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(_markdown(report, results))
    paths["html"].write_text(_html(report, results))
    return paths
