"""Host overhead per call: what unihal adds around a backend's kernel (validation, value checks,
selection), per operator, in microseconds.

For each operator, the smallest quick conformance case is run through the public ``hal`` API,
as a user calls it; the backend implementations it reaches are recorded with their arguments
(already validated) and then called directly. The overhead is the difference of the two
medians, both timed in one interleaved run:

    overhead = median(public call) - median(the same implementation calls, direct)

So the overhead includes argument checks, value-range checks (on unless ``HAL_CHECK_VALUES=0``),
backend selection, and whatever the public path does around the hooks (output allocation, tuple
packing; for ``mla_decode``, the ``get_mla_metadata`` call the case makes first, whose scheduler
is reached without ``hal.dispatch.call`` and so counts whole), which is host work a user pays on
every call.

    python -m hal.bench.overhead [--op NAME ...] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hal.conformance.case import Case, copied_to
from hal.conformance.catalogue import select_cases

__all__ = ["measure", "main"]

# The ops modules that reach a backend through ``hal.dispatch.call`` (each imports it by name).
_OPS_MODULES = ("ep", "ep_local", "fp8_quant", "gemm", "gemm_bf16", "gemm_v2", "indexer", "mla", "mla_fp8_cache", "mla_v2")


def _size(case: Case) -> int:
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    return sum(v.numel() for v in inputs.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _recording(calls: list[tuple[str, Callable[..., Any], dict[str, Any]]]) -> Iterator[None]:
    """Record each backend implementation a public call reaches: the backend's name, the
    implementation and its (validated) arguments."""
    from hal import dispatch
    from hal.selection import select

    def recorder(op: Any, device_arg: str, device: torch.device, /, *, features: Any = (), **arguments: Any) -> Any:
        backend = select(op, device.type, device_arg=device_arg, features=features).backend
        implementation = backend.impl(op.hook)
        calls.append((backend.name, implementation, dict(arguments)))
        return implementation(**arguments)

    modules = [importlib.import_module(f"hal.ops.{name}") for name in _OPS_MODULES]
    saved = [module.call for module in modules]
    try:
        for module in modules:
            module.call = recorder
        dispatch_call, dispatch.call = dispatch.call, recorder
        yield
    finally:
        dispatch.call = dispatch_call
        for module, original in zip(modules, saved):
            module.call = original


def _median_us(fn: Callable[[], Any], batch: int) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        return (time.perf_counter() - start) / batch * 1e6

    return once


def measure(ops: list[str] | None = None, repeats: int = 9, budget_s: float = 0.05) -> list[dict[str, Any]]:
    """One record per operator: ``public_us``, ``direct_us``, ``overhead_us`` (medians of
    ``repeats`` interleaved batches), the case, and the backend(s) reached."""
    by_op: dict[str, list[Case]] = {}
    for case in select_cases(quick=True):
        if not ops or any(fnmatch.fnmatch(case.op, p) for p in ops):
            by_op.setdefault(case.op, []).append(case)
    records = []
    for op, cases in sorted(by_op.items()):
        if op.startswith("ep_") and op not in ("ep_dispatch_layout", "ep_pack", "ep_unpack", "ep_combine_reduce"):
            continue
        case = min(cases, key=_size)
        inputs = copied_to(case.family.build(case.params, torch.Generator().manual_seed(case.seed)), "cpu")
        calls: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        try:
            with _recording(calls):
                case.family.run(inputs)
        except Exception as exc:  # a case this machine cannot run: say so, never hide it
            records.append({"op": op, "case": case.id, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        if not calls:
            records.append({"op": op, "case": case.id, "skipped": "the public call reached no backend"})
            continue

        def public() -> Any:
            return case.family.run(inputs)

        def direct() -> Any:
            for _, implementation, arguments in calls:
                implementation(**arguments)

        start = time.perf_counter()
        public()
        batch = max(1, min(2000, int(budget_s / max(time.perf_counter() - start, 1e-7))))
        timers = {"public": _median_us(public, batch), "direct": _median_us(direct, batch)}
        for timer in timers.values():  # warm-up
            timer()
        samples: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(repeats):
            for name, timer in timers.items():
                samples[name].append(timer())
        public_us, direct_us = statistics.median(samples["public"]), statistics.median(samples["direct"])
        records.append({"op": op, "case": case.id, "backends": sorted({name for name, _, _ in calls}), "hal_calls": len(calls), "public_us": public_us,
                        "direct_us": direct_us, "overhead_us": public_us - direct_us, "batch": batch, "repeats": repeats})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", default=[], help="operator name or pattern (repeatable; default: all)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny inputs: threads only add noise to host timings
    records = measure(args.op or None, args.repeats)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'operator':34s} {'backend':12s} {'public us':>10s} {'direct us':>10s} {'overhead us':>12s}")
    for r in records:
        if "skipped" in r:
            print(f"{r['op']:34s} skipped: {r['skipped']}")
            continue
        print(f"{r['op']:34s} {','.join(r['backends']):12s} {r['public_us']:10.1f} {r['direct_us']:10.1f} {r['overhead_us']:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
