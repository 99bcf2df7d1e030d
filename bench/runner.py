"""``hal bench``: time catalogue cases on backends and peers; fractions of the bound and ratios.

For each case and device: the case's peak memory is estimated first and the case skipped, with
the reason, when the estimate exceeds the memory budget (:mod:`hal.bench.memory`). Then every
requested backend that can take the device's tensors, and each peer's fastest correct
formulation (:mod:`hal.bench.formulation`). Each contender's output is checked once against the
reference with the conformance tolerance before it is timed; a wrong result is reported, not
ranked. The checked contenders are then timed interleaved (:func:`~hal.bench.timing.measure_interleaved`),
each run finding its inputs out of the caches, as a model's layers find their weights (on CPUs
by rotating through copies of the inputs, else by a flush: :mod:`hal.bench.cache`; ``hot_cache``
keeps them cached).

A result's ``fraction_of_bound`` is ``bound_s / median_s``, where ``bound_s`` is the larger of
bytes / copy bandwidth and FLOPs / the matmul rate of the case's ``compute_dtype`` (bf16 for
bf16 and FP8 operands, else fp32; see :mod:`hal.bench.work`), both measured on this machine at
the start of the run (:mod:`hal.bench.peaks`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hal import registry
from hal.bench.cache import CacheFlush, cache_flush, input_sets
from hal.bench.formulation import choose_fastest, peak_scratch
from hal.bench.machine import load, machine, versions
from hal.bench.memory import OUTPUT_KEYS, CaseMemory, MemoryBudget, case_memory, human
from hal.bench.peaks import Peaks, measured_peaks
from hal.bench.peers import PeerSpec, peer_specs
from hal.bench.timing import measure_interleaved
from hal.bench.work import Work, work_of
from hal.checks import ENV_CHECK_VALUES
from hal.conformance.case import Case, Tensors, copied_to, on_cpu
from hal.conformance.devices import pick_device
from hal.conformance.report import environment
from hal.operator import get_operator
from hal.selection import use_backend

__all__ = ["bench_case", "bench", "save_results", "BOUNDS"]

# How a fraction of bound is computed, stated in every results file.
BOUNDS = (
    "fraction_of_bound = bound_s / median_s; bound_s = max(bytes / copy_bytes_per_s, flops / matmul_flops_per_s[compute_dtype]); "
    "compute_dtype is bfloat16 where the operands are bf16 or FP8 (exact in bf16: MLA decode on a bf16 cache, FP8 and bf16 GEMMs, "
    "the indexer), else float32; peaks are medians of interleaved runs measured at the start of the run"
)


@dataclass(frozen=True)
class _Contender:
    name: str
    kind: str  # "backend" or "peer"
    call: Callable[[], Any]
    formulation: str = ""
    # The same contender's call on another copy of the inputs (input rotation, :func:`_rotated`).
    on_copy: Callable[[Tensors], Callable[[], Any]] | None = None


def _device_inputs(case: Case, device: str) -> Tensors:
    """The case's inputs on ``device``. Unused cache slots, poisoned with NaN by conformance, are
    zeroed in place: dense peers read them (masked), and a NaN times a zero weight is still NaN."""
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key not in OUTPUT_KEYS and value.is_floating_point() and value.element_size() > 1:
                value.nan_to_num_(0.0)
        moved[key] = value
    return moved


def _private_outputs(inputs: Tensors) -> Tensors:
    """``inputs`` sharing every read-only tensor, with fresh copies of the outputs written in place:
    what each timed contender runs on, so timing holds one copy of the inputs, not one per contender."""
    return {k: v.clone() if k in OUTPUT_KEYS and isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _check(case: Case, outputs: Tensors, expected: Tensors, inputs: Tensors) -> str:
    """Why ``outputs`` are out of tolerance, or "" when they pass. Outputs a peer does not
    produce are not judged; nor are rows a peer may rewrite (padding and masked-off rows),
    which only unihal's own contract pins."""
    merged = {**expected, **on_cpu(outputs)}
    failed = [m for m in case.family.compare(merged, expected, on_cpu(inputs)) if not m.passed and m.metric != "untouched"]
    if failed:
        return f"{failed[0].output}: {failed[0].note or f'{failed[0].metric} {failed[0].value:.3g}'}"
    return ""


def _entry(contender: _Contender, work: Work, peaks: Peaks, timing: Any = None, note: str = "") -> dict[str, Any]:
    entry: dict[str, Any] = {"name": contender.name, "kind": contender.kind, "note": note}
    if contender.formulation:
        entry["formulation"] = contender.formulation
    if timing is None:
        return entry
    seconds = timing.median_s
    matmul = peaks.flops_per_s(work.compute_dtype)
    memory_s, compute_s = work.bytes / peaks.copy_bytes_per_s, work.flops / matmul
    entry.update(
        median_s=seconds, min_s=timing.min_s, max_s=timing.max_s, repeats=timing.repeats,
        bytes_per_s=work.bytes / seconds, flops_per_s=work.flops / seconds,
        fraction_of_copy_bw=work.bytes / seconds / peaks.copy_bytes_per_s, fraction_of_matmul=work.flops / seconds / matmul,
        bound="copy" if memory_s >= compute_s else f"matmul {work.compute_dtype}", bound_s=max(memory_s, compute_s),
        fraction_of_bound=max(memory_s, compute_s) / seconds,
    )
    return entry


def _backend_contenders(case: Case, names: Sequence[str], inputs: Tensors, expected: Tensors, device: str) -> tuple[list[_Contender], dict[str, str]]:
    """Backends whose output passes the check (each run on a fresh copy of the inputs), and why the others were not timed."""
    checked, rejected = [], {}
    for name in names:
        try:
            with use_backend(name):
                outputs = case.family.run(copied_to(inputs, device))
            why = _check(case, outputs, expected, inputs)
        except Exception as exc:
            rejected[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if why:
            rejected[name] = f"wrong result, not timed ({why})"
            continue
        def on_copy(copy: Tensors, name: str = name) -> Callable[[], Any]:
            timed_inputs = _private_outputs(copy)

            def call() -> Any:
                with use_backend(name):
                    return case.family.run(timed_inputs)

            return call

        checked.append(_Contender(name, "backend", on_copy(inputs), on_copy=on_copy))
    return checked, rejected


# Untimed runs of a contender right before each of its timed runs. Timed straight after another
# contender, a short kernel pays for the switch: on the 2-core VM an m=2 FP8 GEMM (0.67 ms back to
# back) took 0.83-1.0 ms right after torch's 7 ms peer, after 7 ms of other compute and after 7 ms
# idle alike (CPU and memory clocks ramping, threads waking), where the peer barely notices. One
# lead-in run lets each contender be timed in its own steady state, still interleaved round by
# round against drift in the machine's load; with rotated inputs the lead-in takes its own set,
# so the timed run still finds its inputs in memory.
LEAD_IN = 1
# Where inputs are rotated (CPUs), a read of twice the last-level cache comes before each lead-in:
# one lead-in alone left the previous contender's lines in the caches, dirty ones among them (a peer
# that writes dequantised weights), and their write-back was charged to the next timed run. Measured
# on the 2-core VM, m=4 n=32768 K=512 FP8 GEMM against torch's peer, medians of 2 runs: one lead-in
# 1.27-1.32 ms, three lead-ins 0.98-1.03, the read then one lead-in 0.91-0.95, the kernel timed
# with no peer at all 0.84-0.93.
TIMING = (
    f"each timed run follows {LEAD_IN} untimed run of the same contender (on the next input set where "
    "inputs are rotated, and there, when contenders take turns, after a read of twice the last-level cache), "
    "so that none is timed in the wake of another's; contenders interleaved round by round"
)


def _time(
    contenders: list[_Contender], device: str, repeats: int, flush: CacheFlush | None = None, settle: CacheFlush | None = None
) -> tuple[dict[str, Any], dict[str, str], bool]:
    """Warm each contender up (dropping any that raise), then time the rest interleaved, ``flush``
    (the caches evicted) before every timed run, each after :data:`LEAD_IN` untimed runs of its own,
    ``settle`` (the previous contender's lines evicted) before those when two or more are left.
    Returns the timings, why contenders failed, and whether ``settle`` ran."""
    running, failed = [], {}
    for contender in contenders:
        try:
            contender.call()
            running.append(contender)
        except Exception as exc:
            failed[contender.name] = f"{type(exc).__name__}: {exc}"[:300]
    settle = settle if len(running) > 1 else None  # one contender follows only itself
    timings = measure_interleaved([c.call for c in running], device, warmup=1, repeats=repeats, before=flush, lead_in=LEAD_IN,
                                  settle=settle) if running else []
    return dict(zip((c.name for c in running), timings)), failed, settle is not None


def _over_budget(memory: CaseMemory, allowed: int | None, budget: MemoryBudget | None) -> str:
    """Why the case is skipped, or "" when its estimate fits."""
    if allowed is None or budget is None or memory.total <= allowed:
        return ""
    return (
        f"estimated peak {human(memory.total)} (inputs {human(memory.inputs)} x2, outputs, scratch) "
        f"exceeds the memory budget ({budget.describe()}{'' if budget.limit_bytes is not None else f': {human(allowed)} now'}); raise it with --memory-budget"
    )


def _peer_contenders(
    case: Case, specs: Sequence[PeerSpec], inputs: Tensors, expected: Tensors, device: str, room: int | None
) -> tuple[list[_Contender], dict[str, str], list[dict[str, Any]]]:
    """Each peer's fastest correct formulation; why a peer has none; every formulation's record."""
    contenders, rejected, records = [], {}, []
    for spec in specs:
        choice = choose_fastest(spec.formulations, _private_outputs(inputs), device, lambda out: _check(case, out, expected, inputs), room)
        records.append({"name": spec.name, "formulation": choice.name, "formulations": choice.tried})
        if choice.prepared is None:
            rejected[spec.name] = "no formulation was correct and within the memory budget: " + "; ".join(f"{t['formulation']}: {t['status']}" for t in choice.tried)
        else:
            chosen = next(f for f in spec.formulations if f.name == choice.name)
            contenders.append(_Contender(spec.name, "peer", choice.prepared.call, choice.name,
                                         on_copy=lambda copy, chosen=chosen: chosen.prepare(_private_outputs(copy)).call))
    return contenders, rejected, records


def _copy_of(inputs: Tensors) -> Tensors:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _rotated(contenders: list[_Contender], inputs: Tensors, sets: int) -> list[_Contender]:
    """The contenders timed on ``sets`` sets of the inputs (``inputs`` and copies of it): the k-th
    run of any contender takes set k mod ``sets``, so a set is read again only after every other
    set has been (the sets together fill twice the last-level cache) and each run finds its inputs
    evicted, as a model's layers find their weights, while the host path's own data stays warm
    (a cache flush would evict it too). The copies are made once and shared by the contenders."""
    if sets <= 1:
        return contenders
    copies = [_copy_of(inputs) for _ in range(sets - 1)]
    runs = itertools.count()
    rotated = []
    for contender in contenders:
        if contender.on_copy is None:
            rotated.append(contender)
            continue
        calls = [contender.call] + [contender.on_copy(copy) for copy in copies]
        rotated.append(replace(contender, call=lambda calls=calls: calls[next(runs) % sets]()))
    return rotated


def bench_case(
    case: Case, backends: Sequence[str], device: str, *, with_peers: bool = True, repeats: int = 20, budget: MemoryBudget | None = None,
    flush: CacheFlush | None = None,
) -> dict[str, Any]:
    """Time one case on ``backends`` (all on ``device``) and its peers; see the module docstring.
    ``flush`` (default: :func:`~hal.bench.cache.cache_flush` of ``device``) says how the inputs are
    kept out of the caches (:func:`~hal.bench.cache.input_sets`)."""
    inputs = _device_inputs(case, device)
    work = work_of(case.op, inputs)
    unsupported = [name for name in backends if not _implements(name, case.op)]
    runnable = [name for name in backends if name not in unsupported]
    specs = peer_specs(case.op, device) if with_peers else []
    memory = case_memory(case.op, inputs, work.bytes, len(runnable) + len(specs))
    record: dict[str, Any] = {
        "case": case.id, "op": case.op, "params": dict(case.params), "device": device,
        "work": {"bytes": work.bytes, "flops": work.flops, "compute_dtype": work.compute_dtype},
        "memory_estimate": memory.to_json(), "results": [],
    }
    allowed = budget.bytes_now(device) if budget is not None else None
    skipped = _over_budget(memory, allowed, budget)
    if skipped:
        return record | {"skipped": skipped}
    room = None if allowed is None else allowed - memory.total
    peer_bytes = max((peak_scratch(spec.formulations, inputs, device, room) for spec in specs), default=0)
    record["memory_estimate"].update(peer_scratch=peer_bytes, total_with_peer=memory.total + peer_bytes)
    peaks = measured_peaks(device)
    expected = on_cpu(case.family.expect(_private_outputs(inputs)))
    contenders, rejected = _backend_contenders(case, runnable, inputs, expected, device)
    peers, no_peer, record["peers"] = _peer_contenders(case, specs, inputs, expected, device, room)
    contenders += peers
    rejected.update(no_peer)
    flush = flush if flush is not None else cache_flush(device)
    # contenders taking turns over rotated inputs read flush's buffer before each lead-in: it takes room too
    settling = len(contenders) > 1 and flush.device == "cpu" and not flush.hot
    sets, flushed = input_sets(flush, memory.inputs, None if room is None else room - peer_bytes - (flush.bytes if settling else 0), peer_bytes)
    timings, failed, settled = _time(_rotated(contenders, inputs, sets), device, repeats, flush if flushed else None,
                                     flush if settling and sets > 1 else None)
    record["caches"] = {"input_sets": sets, "flushed": flushed, "settled": settled}
    rejected.update(failed)
    entries = [_entry(_Contender(n, "backend", _idle), work, peaks, note=f"unsupported: {n} does not implement {case.op}") for n in unsupported]
    entries += [_entry(c, work, peaks, timings.get(c.name), rejected.get(c.name, "")) for c in contenders]
    kinds = {spec.name: "peer" for spec in specs}
    timed_or_tried = {c.name for c in contenders}
    entries += [_entry(_Contender(n, kinds.get(n, "backend"), _idle), work, peaks, note=why) for n, why in rejected.items() if n not in timed_or_tried]
    _add_ratios(entries)
    record["results"] = entries
    return record


def _idle() -> None:
    """The call of a contender that is reported but never run."""


def _add_ratios(entries: list[dict[str, Any]]) -> None:
    """``speedup_vs`` every other timed contender, and ``ratio_to_peer``: the torch peer's time / this one's (> 1: faster than torch)."""
    timed = {e["name"]: e["median_s"] for e in entries if "median_s" in e}
    for e in entries:
        if "median_s" in e:
            e["speedup_vs"] = {other: t / e["median_s"] for other, t in timed.items() if other != e["name"]}
            e["ratio_to_peer"] = timed["torch"] / e["median_s"] if "torch" in timed else None


def bench(
    backends: Sequence[str], cases: Sequence[Case], *, with_peers: bool = True, repeats: int = 20,
    budget: MemoryBudget | None = None, progress: Callable[[dict[str, Any]], None] | None = None, hot_cache: bool = False,
) -> dict[str, Any]:
    """Benchmark ``cases``; backends are grouped by the device their tensors live on. ``budget``
    defaults to :class:`MemoryBudget`'s fraction of available memory. Every timed run finds its
    inputs out of the caches unless ``hot_cache`` (:mod:`hal.bench.cache`)."""
    budget = budget if budget is not None else MemoryBudget()
    by_device: dict[str, list[str]] = {}
    for name in backends:
        by_device.setdefault(pick_device(name), []).append(name)
    load_at_start = load()
    budget_at_start = budget.to_json(next(iter(by_device), "cpu"))
    peaks = {device: measured_peaks(device) for device in by_device}  # before any case: nothing else allocated
    flushes = {device: cache_flush(device, hot=hot_cache) for device in by_device}
    saved = os.environ.get(ENV_CHECK_VALUES)
    os.environ[ENV_CHECK_VALUES] = "0"  # as deployed: no device syncs for argument value checks
    try:
        records = []
        for device, names in by_device.items():
            for case in cases:
                if not any(_implements(n, case.op) for n in names):
                    continue
                record = bench_case(case, names, device, with_peers=with_peers, repeats=repeats, budget=budget, flush=flushes[device])
                records.append(record)
                if progress:
                    progress(record)
    finally:
        for flush in flushes.values():
            flush.release()
        if saved is None:
            os.environ.pop(ENV_CHECK_VALUES, None)
        else:
            os.environ[ENV_CHECK_VALUES] = saved
    return {
        "environment": environment(), "machine": machine(), "versions": versions(),
        "load": {"start": load_at_start, "end": load()},
        "memory_budget": budget_at_start,
        "peaks": {device: p.to_json() for device, p in peaks.items()},
        "caches": {device: f.to_json() for device, f in flushes.items()},
        "bounds": BOUNDS,
        "timing": TIMING,
        "cases": records,
    }


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
