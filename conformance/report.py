"""Conformance reports: ``report.json`` (machine-readable), ``report.md`` and a self-contained
``report.html`` a vendor can publish: backend, device, package and certificate identity, a summary,
every failure with its reason in plain sight, the operator x case matrix coloured by status and by
margin to threshold, and every threshold with its source."""

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


def build_report(results: Sequence[CaseResult], *, mode: str, certificates: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "environment": environment(),
        "mode": mode,
        "certificates": dict(certificates or {}),
        "tolerances": {
            f"{op}.{out}": {"metric": t.metric, "threshold": t.threshold, "source": t.source,
                            "element_bound": t.element.source if t.element is not None else None}
            for (op, out), t in TOLERANCES.items()
        },
        "summary": summarize(results),
        "results": [r.to_json() for r in results],
    }


_NEAR = "#7cb342"  # a pass whose worst error is at least half its threshold


def _margin(result: CaseResult) -> float | None:
    """The worst error as a fraction of its threshold (0 = exact), None without a measurement."""
    worst = result.worst()
    if worst is None:
        return None
    if not worst.threshold:
        return 0.0 if worst.value == 0 else float("inf")
    return worst.value / worst.threshold


def _cell_text(result: CaseResult) -> str:
    """``pass 12%`` (worst error as a share of its threshold), ``pass exact``, or the status."""
    if result.status != "pass":
        return result.status
    margin = _margin(result)
    if margin is None:
        return "pass"
    return "pass exact" if margin == 0 else f"pass {margin:.0%}" if margin >= 0.01 else "pass <1%"


def _cell_colour(result: CaseResult) -> str:
    if result.status == "pass" and (_margin(result) or 0.0) >= 0.5:
        return _NEAR
    return _COLOURS[result.status]


def _title(report: dict[str, Any]) -> str:
    return "unihal conformance: " + ", ".join(report["summary"]) + f" ({report['mode']})"


def _identity_rows(report: dict[str, Any], results: Sequence[CaseResult]) -> list[tuple[str, str, str, str, str]]:
    """(backend, device, package, kind, certificate) per backend that ran."""
    env = report["environment"]
    devices = {r.backend: r.device for r in results}
    rows = []
    for backend in report["summary"]:
        found = registry.get_backend(backend)
        source = found.source if found is not None else ""
        info = env["backends"].get(backend, {})
        kind = "simulated" if info.get("simulated") else "hardware" if backend != "reference" else "reference (the contract)"
        cert = report["certificates"].get(backend, "")
        rows.append((backend, devices.get(backend) or info.get("device", ""), source, kind, cert))
    return rows


def _failures(results: Sequence[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.status not in ("pass", "unsupported")]


def _measurement_text(r: CaseResult) -> str:
    return "; ".join(
        f"{m.output} {m.metric} {m.value:.3g} vs {m.threshold:g}" + (f" ({m.note})" if m.note else "") for m in r.measurements if not m.passed
    )


def _markdown(report: dict[str, Any], results: Sequence[CaseResult]) -> str:
    env = report["environment"]
    lines = [
        f"# {_title(report)}",
        "",
        f"{env['date']}; host {env['host']} ({env['platform']}); torch {env['torch']}; unihal {env['unihal']}; tier {report['mode']}.",
        "",
        "| backend | device | package | kind | certificate sha256 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {d} | {p} | {k} | {c[:16] + '…' if c else '-'} |" for b, d, p, k, c in _identity_rows(report, results)]
    lines += ["", "| backend | " + " | ".join(STATUSES) + " | total |", "|---|" + "---|" * len(STATUSES) + "---|"]
    for backend, counts in report["summary"].items():
        lines.append(f"| {backend} | " + " | ".join(str(counts[s]) for s in STATUSES) + f" | {counts['total']} |")
    feature_ops = {op.name: [f.name for f in op.features] for op in OPERATORS.values() if op.features}
    lines += ["", "Contract features per backend that ran (+ served, - not):", "", "| backend | " + " | ".join(feature_ops) + " |", "|---|" + "---|" * len(feature_ops)]
    for backend in report["summary"]:
        declared = env["backends"].get(backend, {}).get("features", {})
        cells = [
            " ".join(("+" if f in declared[op] else "-") + f for f in names) if op in declared else "not implemented"
            for op, names in feature_ops.items()
        ]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    failures = _failures(results)
    lines += ["", f"## Failures ({len(failures)})", ""]
    lines += [f"- **{r.backend}** `{r.case_id}`: {r.status}. {r.reason or _measurement_text(r)}".rstrip() for r in failures] or ["None."]
    lines += ["", "## Every case", "", "| backend | case | result | worst error / threshold |", "|---|---|---|---|"]
    for r in results:
        worst = r.worst()
        if worst is None:
            metric = ""
        elif worst.metric == "mismatches":
            metric = "exact" if worst.value == 0 else f"{worst.value:g} mismatches"
        else:
            metric = f"{worst.output}: {worst.metric} {worst.value:.3g} / {worst.threshold:g}"
        lines.append(f"| {r.backend} | `{r.case_id}` | {_cell_text(r)} | {metric} |")
    lines += ["", "## Thresholds", "", "| output | metric | passes when | per-element bound | source |", "|---|---|---|---|---|"]
    for key, t in report["tolerances"].items():
        rule = "exactly equal" if t["metric"] == "mismatches" else f"< {t['threshold']:g}"
        lines.append(f"| {key} | {t['metric']} | {rule} | {t['element_bound'] or '-'} | {t['source']} |")
    return "\n".join(lines) + "\n"


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
                f'<td class="{r.status}" style="background:{_cell_colour(r)}" title="{html.escape(detail)}">{html.escape(_cell_text(r))}</td>'
            )
        rows.append(f"<tr><th class=\"case\">{html.escape(name)}</th>{''.join(cells)}</tr>")
    summary_rows = "".join(
        f"<tr><th>{html.escape(b)}</th>" + "".join(f'<td class="n">{c[s]}</td>' for s in STATUSES) + f'<td class="n">{c["total"]}</td></tr>'
        for b, c in report["summary"].items()
    )
    identity_rows = "".join(
        f"<tr><th>{html.escape(b)}</th><td>{html.escape(d)}</td><td>{html.escape(p)}</td><td>{html.escape(k)}</td>"
        f"<td class=\"mono\">{html.escape(c) if c else '-'}</td></tr>"
        for b, d, p, k, c in _identity_rows(report, results)
    )
    failures = "".join(
        f"<li><b>{html.escape(r.backend)}</b> <code>{html.escape(r.case_id)}</code>: {html.escape(r.status)}. "
        f"{html.escape(r.reason or _measurement_text(r))}</li>"
        for r in _failures(results)
    ) or "<li>None.</li>"
    thresholds = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(t['metric'])}</td>"
        f"<td>{'exactly equal' if t['metric'] == 'mismatches' else '&lt; ' + format(t['threshold'], 'g')}</td>"
        f"<td>{html.escape(t['element_bound'] or '-')}</td><td>{html.escape(t['source'])}</td></tr>"
        for key, t in report["tolerances"].items()
    )
    legend = " ".join(f'<span class="chip" style="background:{c}">{s}</span>' for s, c in _COLOURS.items())
    legend += f' <span class="chip" style="background:{_NEAR}">pass, error at least half its threshold</span>'
    title = html.escape(_title(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
td.pass, td.fail, td.error, td.timeout, td.crash, td.unsupported {{ color: #fff; text-align: center; font-family: monospace; min-width: 80px; }}
tr.op th {{ background: #eee; text-align: left; }}
th.case {{ text-align: left; font-weight: normal; font-family: monospace; }}
td.n {{ text-align: right; }}
.mono, code {{ font-family: monospace; }}
.chip {{ color: #fff; padding: 2px 8px; border-radius: 4px; margin-right: 4px; }}
</style></head><body>
<h1>{title}</h1>
<p>{html.escape(env['date'])}; host {html.escape(env['host'])} ({html.escape(env['platform'])}); torch {html.escape(env['torch'])}; unihal {html.escape(env['unihal'])}; tier {html.escape(report['mode'])}.</p>
<h2>Backends</h2>
<table id="identity"><tr><th>backend</th><th>device</th><th>package</th><th>kind</th><th>certificate sha256</th></tr>{identity_rows}</table>
<h2>Summary</h2>
<table id="summary"><tr><th>backend</th>{''.join(f'<th>{s}</th>' for s in STATUSES)}<th>total</th></tr>{summary_rows}</table>
<h2>Failures</h2>
<ul id="failures">{failures}</ul>
<h2>Matrix</h2>
<p>{legend} A passing cell shows its worst error as a share of that output's threshold ("exact": bit-identical); hover for every measurement.</p>
<table id="matrix"><tr><th>case</th>{''.join(f'<th>{html.escape(b)}</th>' for b in backends)}</tr>{''.join(rows)}</table>
<h2>Thresholds</h2>
<table id="thresholds"><tr><th>output</th><th>metric</th><th>passes when</th><th>per-element bound</th><th>source</th></tr>{thresholds}</table>
</body></html>
"""


def write_reports(results: Sequence[CaseResult], directory: Path, *, mode: str, certificates: dict[str, str] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(results, mode=mode, certificates=certificates)
    paths = {"json": directory / "report.json", "md": directory / "report.md", "html": directory / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(_markdown(report, results))
    paths["html"].write_text(_html(report, results))
    return paths
