"""``hal bench``: time catalogue cases on backends and peers; fractions of peak and ratios.

For each case and device: every requested backend that can take the device's tensors, then the
peers found for the operator. Each contender's output is checked once against the reference
with the conformance tolerance before it is timed; a wrong result is reported, not ranked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hal import registry
from hal.bench.peaks import measured_peaks
from hal.bench.peers import peers_for
from hal.bench.timing import measure
from hal.bench.work import work_of
from hal.checks import ENV_CHECK_VALUES
from hal.conformance.case import Case, Tensors, copied_to, on_cpu
from hal.conformance.report import environment
from hal.conformance.devices import pick_device
from hal.operator import get_operator
from hal.selection import use_backend

__all__ = ["bench_case", "bench", "save_results"]


def _device_inputs(case: Case, device: str) -> Tensors:
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key != "out" and value.is_floating_point() and value.element_size() > 1:
                value = value.nan_to_num(0.0)  # conformance poisons unused cache slots; dense peers read them
        moved[key] = value
    return moved


def _check(case: Case, outputs: Tensors, expected: Tensors, inputs: Tensors) -> str:
    """Why ``outputs`` are out of tolerance, or "" when they pass. Outputs a peer does not
    produce (torch's SDPA has no lse) are not judged; nor are rows a peer may rewrite
    (padding and masked-off rows), which only unihal's own contract pins."""
    merged = {**expected, **on_cpu(outputs)}
    failed = [m for m in case.family.compare(merged, expected, on_cpu(inputs)) if not m.passed and m.metric != "untouched"]
    if failed:
        return f"{failed[0].output}: {failed[0].note or f'{failed[0].metric} {failed[0].value:.3g}'}"
    return ""


def _entry(name: str, kind: str, seconds: float | None, work: Any, peaks: Any, note: str = "") -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "kind": kind, "note": note}
    if seconds is None:
        return entry
    entry["median_s"] = seconds
    entry["bytes_per_s"] = work.bytes / seconds
    entry["flops_per_s"] = work.flops / seconds
    entry["fraction_of_copy_bw"] = entry["bytes_per_s"] / peaks.copy_bytes_per_s
    entry["fraction_of_matmul"] = entry["flops_per_s"] / peaks.matmul_flops_per_s
    bound = max(work.bytes / peaks.copy_bytes_per_s, work.flops / peaks.matmul_flops_per_s)
    entry["fraction_of_bound"] = bound / seconds
    return entry


def bench_case(case: Case, backends: Sequence[str], device: str, *, with_peers: bool = True, repeats: int = 20) -> dict[str, Any]:
    """Time one case on ``backends`` (all on ``device``) and its peers; see the module docstring."""
    inputs = _device_inputs(case, device)
    expected = on_cpu(case.family.expect(copied_to(inputs, device)))
    work = work_of(case.op, inputs)
    peaks = measured_peaks(device)
    contenders: list[tuple[str, str, Callable[[], Any], Callable[[], Tensors]]] = []
    unsupported = [name for name in backends if not _implements(name, case.op)]
    for name in (n for n in backends if n not in unsupported):
        def outputs(name: str = name) -> Tensors:
            with use_backend(name):
                return case.family.run(copied_to(inputs, device))

        timed_inputs = copied_to(inputs, device)

        def call(name: str = name, timed_inputs: Tensors = timed_inputs) -> Any:
            with use_backend(name):
                return case.family.run(timed_inputs)

        contenders.append((name, "backend", call, outputs))
    notes = []
    if with_peers:
        peers, problems = peers_for(case.op, copied_to(inputs, device), device)
        notes += problems
        contenders += [(p.name, "peer", p.call, p.outputs) for p in peers]
    entries = [_entry(name, "backend", None, work, peaks, f"unsupported: {name} does not implement {case.op}") for name in unsupported]
    for name, kind, call, outputs in contenders:
        try:
            why = _check(case, outputs(), expected, inputs)
            if why:
                entries.append(_entry(name, kind, None, work, peaks, f"wrong result, not timed ({why})"))
                continue
            timing = measure(call, device, repeats=repeats)
            entries.append(_entry(name, kind, timing.median_s, work, peaks))
        except Exception as exc:
            entries.append(_entry(name, kind, None, work, peaks, f"{type(exc).__name__}: {exc}"[:300]))
    timed = {e["name"]: e["median_s"] for e in entries if "median_s" in e}
    for e in entries:
        if "median_s" in e:
            e["speedup_vs"] = {other: t / e["median_s"] for other, t in timed.items() if other != e["name"]}
    return {
        "case": case.id,
        "op": case.op,
        "params": {k: v for k, v in case.params.items()},
        "device": device,
        "work": {"bytes": work.bytes, "flops": work.flops},
        "results": entries,
        "notes": notes,
    }


def bench(backends: Sequence[str], cases: Sequence[Case], *, with_peers: bool = True, repeats: int = 20, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Benchmark ``cases``; backends are grouped by the device their tensors live on."""
    by_device: dict[str, list[str]] = {}
    for name in backends:
        by_device.setdefault(pick_device(name), []).append(name)
    saved = os.environ.get(ENV_CHECK_VALUES)
    os.environ[ENV_CHECK_VALUES] = "0"  # as deployed: no device syncs for argument value checks
    try:
        records = []
        for device, names in by_device.items():
            for case in cases:
                if not any(_implements(n, case.op) for n in names):
                    continue
                record = bench_case(case, names, device, with_peers=with_peers, repeats=repeats)
                records.append(record)
                if progress:
                    progress(record)
    finally:
        if saved is None:
            os.environ.pop(ENV_CHECK_VALUES, None)
        else:
            os.environ[ENV_CHECK_VALUES] = saved
    peaks = {device: vars(measured_peaks(device)) for device in by_device}
    return {"environment": environment(), "peaks": peaks, "cases": records}


def _implements(backend: str, op: str) -> bool:
    return registry.get_backend(backend).implements(get_operator(op).hook)


def save_results(report: dict[str, Any], directory: Path) -> Path:
    """Write ``report`` as ``<date>-<host>-<device>.json`` under ``directory``."""
    env = report["environment"]
    device = (env["gpus"][0] if env["gpus"] else "cpu").replace(" ", "_").replace("/", "_")
    name = f"{env['date'][:10]}-{env['host']}-{device}.json"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
