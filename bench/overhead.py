"""Host overhead per call: what unihal adds around a backend's kernel (validation, value checks,
selection), per operator, in microseconds.

For each operator, the smallest quick conformance case is run once with two recorders in place:
one records the public ``hal`` functions the case calls (the outermost calls only, with their
arguments), the other the backend implementations those calls reach (with their validated
arguments and results). Then, interleaved in one run, three things are timed:

- ``public_us``: the public calls, as a user makes them;
- ``direct_us``: the same implementations called directly;
- ``overhead_us``: the public calls with every implementation replaced by its recorded result
  (selection still runs; the replacement is put in place once per batch of calls): the host
  path alone;
- ``stepping_us``, for operators with an int argument that an engine changes every step
  (``max_context_len``, ``expected_m``, ``max_seqlen_k``): the same host path with that argument
  one larger on every call, as in a decoding loop, so that a layout memo keyed by the value
  (checks again every step) shows; None for the other operators.

The third is what is reported as overhead. ``public - direct`` (``difference_us`` in the JSON)
should say the same but carries the noise of both kernels' timings, which for kernels of hundreds
of microseconds (OpenCL launches, cache effects) is larger than the overhead itself.

So the overhead includes argument checks, value-range checks (on unless ``HAL_CHECK_VALUES=0``),
backend selection, and whatever the public path does around the hooks (output allocation, tuple
packing), which is host work a user pays on every call; what the conformance case does around
the public call (building inputs, canonicalising results) is not timed.

Schedules are timed on their own rows. An engine computes ``get_mla_metadata`` and
``get_paged_mqa_logits_metadata`` once per decoding step and passes the result to every layer's
attention call, so an operator's row times its call with the schedule its case made beforehand,
and each schedule function gets a row of its own whose whole time counts as host overhead
(its "direct" column is empty).

    python -m hal.bench.overhead [--op NAME ...] [--case ID ...] [--every-case] [--json]

``--every-case`` times every quick case (one row each, those whose public path converts an input
marked), then names each operator's worst usual case.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import importlib
import inspect
import itertools
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

# Schedule functions a case calls before its operator (a public call each, made once per step).
_SCHEDULES = ("get_mla_metadata", "get_paged_mqa_logits_metadata")

# Int arguments an engine may change every step without changing a tensor's layout (the longest
# context, the expected rows per group, the compressed logits' width): ``stepping_us`` grows them.
_PER_STEP = ("max_context_len", "expected_m", "max_seqlen_k")

# The expert-parallel operators that run in one process (the others need a process group).
_EP_LOCAL = ("ep_dispatch_layout", "ep_pack", "ep_unpack", "ep_combine_reduce")

# Marks in case ids of inputs the public path copies, pads or unpacks (UE8M0 scales) before the
# backend sees them.
_CONVERTING = ("partialk", "strided", "ue8m0", "/nn-", "/tn-", "/tt-", "/v2nn-", "/v2tn-", "/v2tt-")

# The ops modules that reach a backend through ``hal.dispatch.call`` (each imports it by name).
_OPS_MODULES = ("ep", "ep_local", "fp8_quant", "gemm", "gemm_bf16", "gemm_v2", "indexer", "mla", "mla_fp8_cache", "mla_v2")


def _size(case: Case) -> int:
    inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
    return sum(v.numel() for v in inputs.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _recording(calls: list[tuple[str, Callable[..., Any], dict[str, Any]]], results: list[Any], replay: bool = False) -> Iterator[None]:
    """Record each backend implementation a public call reaches: the backend's name, the
    implementation, its (validated) arguments and its result. With ``replay``, selection runs as
    in a real call but the implementation is not called: its recorded result is returned, so that
    what is timed is the host path alone."""
    from hal import dispatch
    from hal.selection import select

    replayed = itertools.cycle(results) if replay and results else None
    types = dispatch._TYPES

    def recorder(op: Any, device_arg: str, device: torch.device, /, *, features: Any = (), **arguments: Any) -> Any:
        device_type = types.get(device) or device.type  # as hal.dispatch.call finds it (device.type costs 0.3 us)
        backend = select(op, device_type, device_arg=device_arg, features=features).backend
        implementation = backend.impl(op.hook)
        if replayed is not None:
            return next(replayed)
        calls.append((backend.name, implementation, dict(arguments)))
        result = implementation(**arguments)
        results.append(result)
        return result

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


PublicCall = tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _public_functions(namespace: Any) -> dict[str, Callable[..., Any]]:
    """The public functions of ``hal`` reachable as attributes of ``namespace``: those of
    ``hal.__all__`` on ``hal`` itself, and on a conformance module the ones it imported by name
    from a ``hal.ops`` module's ``__all__``."""
    found = {}
    for name, value in vars(namespace).items():
        if not callable(value) or isinstance(value, type):
            continue
        home = sys.modules.get(getattr(value, "__module__", "") or "")
        if home is not None and home.__name__.startswith(("hal.ops.", "hal.ep")) and name in getattr(home, "__all__", ()):
            found[name] = value
        elif namespace.__name__ == "hal" and name in getattr(namespace, "__all__", ()):
            found[name] = value
    return found


@contextlib.contextmanager
def _public_calls(made: list[PublicCall], case: Case) -> Iterator[None]:
    """Record each outermost call ``case`` makes to a public function of ``hal`` (its name, the
    function, its arguments); calls those functions make to each other are part of the outer one."""
    import hal

    namespaces = (hal, sys.modules[type(case.family).__module__])
    saved = [(namespace, _public_functions(namespace)) for namespace in namespaces]
    depth = 0

    def recording(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            if depth == 0:
                made.append((name, function, args, kwargs))
            depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth -= 1

        return wrapper

    try:
        for namespace, functions in saved:
            for name, function in functions.items():
                setattr(namespace, name, recording(name, function))
        yield
    finally:
        for namespace, functions in saved:
            for name, function in functions.items():
                setattr(namespace, name, function)


def _stepping(operator_calls: list[PublicCall]) -> Callable[[], Any] | None:
    """The public calls with each positive per-step int argument (``_PER_STEP``) one larger on
    every call; None when no call has one."""
    plans = []
    found = False
    for _, function, args, kwargs in operator_calls:
        bound = inspect.signature(function).bind(*args, **kwargs)
        # 0 is a mode, not a size (max_seqlen_k = 0: the full logits), and stays as it is
        names = [name for name in _PER_STEP if type(bound.arguments.get(name)) is int and bound.arguments[name] > 0]
        found = found or bool(names)
        plans.append((function, bound, names))
    if not found:
        return None
    step = itertools.count(1)

    def calls() -> None:
        n = next(step)
        for function, bound, names in plans:
            if names:
                arguments = dict(bound.arguments)
                for name in names:
                    arguments[name] = bound.arguments[name] + n
                function(**arguments)
            else:
                function(*bound.args, **bound.kwargs)

    return calls


def _median_us(fn: Callable[[], Any], batch: int) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        return (time.perf_counter() - start) / batch * 1e6

    return once


def measure(ops: list[str] | None = None, repeats: int = 9, budget_s: float = 0.05, cases: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per operator: ``public_us``, ``direct_us``, ``overhead_us`` (medians of
    ``repeats`` interleaved batches), the case, and the backend(s) reached. ``cases``: id patterns;
    the smallest matching case of each operator is timed (default: its smallest usual case)."""
    by_op: dict[str, list[Case]] = {}
    for case in select_cases(quick=True):
        if (not ops or any(fnmatch.fnmatch(case.op, p) for p in ops)) and (not cases or any(fnmatch.fnmatch(case.id, p) for p in cases)):
            by_op.setdefault(case.op, []).append(case)
    records = []
    schedule_rows: dict[str, dict[str, Any]] = {}
    for op, of_op in sorted(by_op.items()):
        if op.startswith("ep_") and op not in _EP_LOCAL:
            continue
        # Cases that build their schedule outside the public API (``schedule_sms``: another GPU's
        # schedule, given to every backend) are not what a user's call does; cases built to make the
        # public path convert an input (a partial K block padded, a strided or transposed operand
        # copied) time that copy, which is work, not overhead.
        usual = of_op if cases else [c for c in of_op if c.params.get("schedule_sms") is None and not any(t in c.id for t in _CONVERTING)] or of_op
        case = min(usual, key=_size)
        inputs = copied_to(case.family.build(case.params, torch.Generator().manual_seed(case.seed)), "cpu")
        calls: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        results: list[Any] = []
        made: list[PublicCall] = []
        try:
            with _recording(calls, results), _public_calls(made, case):
                case.family.run(inputs)
        except Exception as exc:  # a case this machine cannot run: say so, never hide it
            records.append({"op": op, "case": case.id, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        operator_calls = [entry for entry in made if entry[0] not in _SCHEDULES]
        if not calls or not operator_calls:
            records.append({"op": op, "case": case.id, "skipped": "the case reached no backend through a public call"})
            continue

        def public() -> Any:
            for _, function, args, kwargs in operator_calls:
                function(*args, **kwargs)

        for name, function, args, kwargs in made:
            if name in _SCHEDULES and name not in schedule_rows:
                timer = _median_us(lambda: function(*args, **kwargs), 200)
                timer()
                us = statistics.median(timer() for _ in range(repeats))
                schedule_rows[name] = {"op": name, "case": case.id, "public": [name], "backends": [], "hal_calls": 0, "public_us": us, "direct_us": None,
                                       "overhead_us": us, "stepping_us": None, "batch": 200, "repeats": repeats}

        def direct() -> Any:
            for _, implementation, arguments in calls:
                implementation(**arguments)

        def host(batch: int, run: Callable[[], Any] = public) -> Callable[[], float]:  # the public calls with each kernel replaced by its recorded result
            timer = _median_us(run, batch)

            def once() -> float:
                with _recording(calls, results, replay=True):
                    return timer()

            return once

        start = time.perf_counter()
        public()
        batch = max(1, min(2000, int(budget_s / max(time.perf_counter() - start, 1e-7))))
        timers = {"public": _median_us(public, batch), "direct": _median_us(direct, batch), "host": host(500)}
        stepping = _stepping(operator_calls)
        if stepping is not None:
            timers["stepping"] = host(500, stepping)
        for timer in timers.values():  # warm-up
            timer()
        samples: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(repeats):
            for name, timer in timers.items():
                samples[name].append(timer())
        median = {name: statistics.median(values) for name, values in samples.items()}
        records.append({
            "op": op, "case": case.id, "public": [name for name, *_ in operator_calls], "backends": sorted({name for name, _, _ in calls}),
            "hal_calls": len(calls), "public_us": median["public"], "direct_us": median["direct"],
            "overhead_us": median["host"], "stepping_us": median.get("stepping"), "difference_us": median["public"] - median["direct"],
            "batch": batch, "repeats": repeats,
        })
    return records + [schedule_rows[name] for name in sorted(schedule_rows)]


def measure_every_case(ops: list[str] | None = None, repeats: int = 9, budget_s: float = 0.05) -> list[dict[str, Any]]:
    """:func:`measure` of every quick case of the operators (not only each one's smallest): one
    record per case, with ``converting`` saying whether the public path copies or converts one of
    its inputs (a transposed operand, packed UE8M0 scales, a partial K block: work that grows with
    the data, not overhead). What an operator's worst call costs, where the default rows show its
    cheapest usual one."""
    records = []
    for case in select_cases(quick=True):
        if ops and not any(fnmatch.fnmatch(case.op, p) for p in ops):
            continue
        if case.params.get("schedule_sms") is not None or (case.op.startswith("ep_") and case.op not in _EP_LOCAL):
            continue
        for record in measure([case.op], repeats, budget_s, cases=[glob.escape(case.id)]):
            if record["op"] == case.op:  # the schedules' own rows: timed with their operator's smallest case
                records.append({**record, "converting": any(t in case.id for t in _CONVERTING)})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", default=[], help="operator name or pattern (repeatable; default: all)")
    parser.add_argument("--case", action="append", default=[], help="case id pattern (repeatable): time these cases, not each operator's smallest usual one")
    parser.add_argument("--every-case", action="store_true", help="time every quick case of the operators, not only each one's smallest usual one")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny inputs: threads only add noise to host timings
    if args.every_case and args.case:
        parser.error("--every-case times every case: give --op to narrow it, not --case")
    records = measure_every_case(args.op or None, args.repeats) if args.every_case else measure(args.op or None, args.repeats, cases=args.case or None)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.every_case:
        _print_every_case(records)
        return 0
    print(f"{'operator':34s} {'backend':12s} {'public us':>10s} {'direct us':>10s} {'overhead us':>12s} {'stepping us':>12s}  (host path alone)")
    for r in records:
        if "skipped" in r:
            print(f"{r['op']:34s} skipped: {r['skipped']}")
            continue
        direct = "-" if r["direct_us"] is None else f"{r['direct_us']:.1f}"
        stepping = "-" if r.get("stepping_us") is None else f"{r['stepping_us']:.1f}"
        print(f"{r['op']:34s} {','.join(r['backends']) or '(host)':12s} {r['public_us']:10.1f} {direct:>10s} {r['overhead_us']:12.1f} {stepping:>12s}")
    return 0


def _print_every_case(records: list[dict[str, Any]]) -> None:
    print(f"{'case':70s} {'backend':10s} {'overhead us':>12s}  (host path alone; C: the public path converts an input)")
    worst: dict[str, dict[str, Any]] = {}
    for r in records:
        if "skipped" in r:
            print(f"{r['case']:70s} skipped: {r['skipped']}")
            continue
        print(f"{r['case']:70s} {','.join(r['backends']):10s} {r['overhead_us']:12.1f}  {'C' if r['converting'] else ''}")
        if not r["converting"] and r["overhead_us"] > worst.get(r["op"], {}).get("overhead_us", -1.0):
            worst[r["op"]] = r
    print("\nworst usual case (no conversion) per operator:")
    for op, r in sorted(worst.items(), key=lambda item: -item[1]["overhead_us"]):
        print(f"  {op:34s} {r['overhead_us']:6.1f} us  {r['case']}")


if __name__ == "__main__":
    raise SystemExit(main())
