"""The picture of a ``hal bench`` run: achieved fraction of the bound per operator and contender.

One group of bars per operator (x), one bar per backend or peer (colour; peers hatched): the bar
is the median over the operator's timed cases, the dots are the cases themselves, on a log scale
since CPU fractions span 0.01% to 100%. The title carries the machine, its measured peaks with
their spread, and the load, so a picture that travels without its JSON still says where it was
taken. matplotlib is optional (``pip install 'unihal[bench]'``) and imported only here, only
when a plot is written.
"""

from __future__ import annotations

import math
import textwrap
import statistics
from pathlib import Path
from typing import Any

__all__ = ["write_plot", "PlotUnavailableError", "fractions_by_op"]

MISSING = "matplotlib is not installed, so no plot was written: pip install 'unihal[bench]' (or matplotlib) to get one"


class PlotUnavailableError(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


def fractions_by_op(report: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """{op: {contender label: [fraction_of_bound of each timed case]}}, in the report's order.
    Peers are labelled ``name (peer)`` so a backend and a peer never share a bar."""
    table: dict[str, dict[str, list[float]]] = {}
    for record in report["cases"]:
        for entry in record.get("results", []):
            if "fraction_of_bound" not in entry:
                continue
            label = entry["name"] + (" (peer)" if entry["kind"] == "peer" else "")
            table.setdefault(record["op"], {}).setdefault(label, []).append(entry["fraction_of_bound"])
    return table


def _title(report: dict[str, Any]) -> str:
    machine, env = report.get("machine", {}), report.get("environment", {})
    lines = ["hal bench: achieved fraction of the bound (bar: median over cases, dots: cases)"]
    lines.append(f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch {report.get('versions', {}).get('torch', '?')}, {env.get('date', '')[:16]}")
    for device, peaks in report.get("peaks", {}).items():
        copy = peaks["copy_bytes_per_s"]
        rates = ", ".join(f"{name} {r['median'] / 1e9:.0f} [{r['low'] / 1e9:.0f}-{r['high'] / 1e9:.0f}] GFLOP/s" for name, r in peaks["matmul_flops_per_s"].items())
        lines.append(f"{device} peaks (median [min-max]): copy {copy['median'] / 1e9:.1f} [{copy['low'] / 1e9:.1f}-{copy['high'] / 1e9:.1f}] GB/s, matmul {rates}")
    if "load" in report:
        lines.append(f"load average (1 min): {report['load']['start']['1min']:.2f} at start, {report['load']['end']['1min']:.2f} at end")
    for device, cache in report.get("caches", {}).items():
        lines.append(f"{device} caches: {cache['policy']}" + (f" (target {cache['bytes'] >> 20} MiB)" if "bytes" in cache else ""))
    # long lines (the cache policy) wrapped, so that none runs off the figure's edge
    return "\n".join(textwrap.fill(line, TITLE_WIDTH, subsequent_indent="    ") for line in lines)


TITLE_WIDTH = 125  # characters per title line: what a 12-inch figure holds at 10 points, beside the legend


# Operators per row: more and the labels of a 2-core machine's 20-operator quick run collide.
OPS_PER_ROW = 7
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _wrapped(op: str, width: int = 20) -> str:
    """The operator's name broken after underscores into lines of about ``width`` characters."""
    lines, line = [], ""
    for part in op.split("_"):
        piece = part if not line else "_" + part
        if line and len(line) + len(piece) > width:
            lines.append(line + "_")
            line = part
        else:
            line += piece
    return "\n".join(lines + [line])


def _draw_row(axes: Any, table: dict[str, dict[str, list[float]]], contenders: list[str], cases: dict[str, int], low: float, slots: int) -> None:
    """One row of operator groups: a bar per contender (median), a dot per case, the bound at 100%."""
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415  (optional dependency)

    width = 0.8 / len(contenders)
    for x, per_op in enumerate(table.values()):
        for i, label in enumerate(contenders):
            values = per_op.get(label)
            if not values:
                continue
            centre, colour, peer = x - 0.4 + width * (i + 0.5), PALETTE[i % len(PALETTE)], label.endswith("(peer)")
            axes.bar(centre, statistics.median(values), width * 0.9, color=colour, alpha=0.55 if peer else 0.85, hatch="//" if peer else None, edgecolor=colour)
            offsets = [width * 0.35 * ((k % 5) - 2) / 2 for k in range(len(values))]
            axes.scatter([centre + o for o in offsets], values, s=14, color="black", zorder=3, linewidths=0)
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yscale("log")
    axes.set_ylim(low, 2.0)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    axes.set_ylabel("achieved / bound")
    labels = [f"{_wrapped(op)}\n({cases[op]} case{'s' if cases[op] != 1 else ''})" for op in table]
    axes.set_xticks(range(len(table)), labels, fontsize=9)
    axes.set_xlim(-0.6, slots - 0.4)
    axes.grid(axis="y", which="major", alpha=0.3)


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """Draw ``report`` (as :func:`hal.bench.runner.bench` returns it) into the PNG ``path``:
    rows of at most :data:`OPS_PER_ROW` operators, one legend, the title described above.

    Raises :class:`PlotUnavailableError` without matplotlib, ValueError when no case was timed.
    """
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415  (optional dependency)
        from matplotlib.patches import Patch  # noqa: PLC0415
    except ImportError as exc:
        raise PlotUnavailableError(MISSING) from exc
    table = fractions_by_op(report)
    if not table:
        raise ValueError("no timed case to plot")
    contenders = list(dict.fromkeys(label for per_op in table.values() for label in per_op))
    cases = {op: len({r["case"] for r in report["cases"] if r["op"] == op and any("fraction_of_bound" in e for e in r.get("results", []))}) for op in table}
    low = 10 ** math.floor(math.log10(min(v for per_op in table.values() for values in per_op.values() for v in values)))
    ops = list(table)
    rows = [ops[i : i + OPS_PER_ROW] for i in range(0, len(ops), OPS_PER_ROW)]
    slots = OPS_PER_ROW if len(rows) > 1 else len(ops)  # several rows share one slot width; one row is as wide as it needs
    figure = Figure(figsize=(max(12.0, 16 * slots / OPS_PER_ROW), 1.4 + 4.2 * len(rows)), dpi=100, layout="constrained")
    for row, axes in zip(rows, figure.subplots(len(rows), 1, squeeze=False)[:, 0]):
        _draw_row(axes, {op: table[op] for op in row}, contenders, cases, low, slots)
    handles = [Patch(facecolor=PALETTE[i % len(PALETTE)], alpha=0.55 if label.endswith("(peer)") else 0.85, hatch="//" if label.endswith("(peer)") else None,
                     edgecolor=PALETTE[i % len(PALETTE)], label=label) for i, label in enumerate(contenders)]
    figure.legend(handles=handles, loc="outside upper right", ncols=len(contenders), fontsize=10)
    figure.suptitle(_title(report), fontsize=10, x=0.01, ha="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
