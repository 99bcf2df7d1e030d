"""Run conformance cases on a backend: in-process with a per-case timeout, or isolated.

In-process, each case runs in a worker thread; a case that exceeds its timeout is reported as
``timeout`` and the suite moves on (the thread cannot be killed and is left to finish in the
background). With ``isolate=True`` the cases run in a child process (``python -m
hal.conformance.worker``); a hang is killed at the timeout and a hard crash (segfault, abort in a
native library) fails only the case in flight: a fresh worker takes the remaining cases.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hal import registry
from hal.conformance.devices import pick_device
from hal.operator import get_operator
from hal.conformance.case import Case, CaseResult, copied_to, on_cpu
from hal.conformance.golden import Golden, load_goldens
from hal.errors import OperatorNotSupportedError
from hal.selection import use_backend

__all__ = ["execute", "run_backend", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
Progress = Callable[[CaseResult], None]


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def execute(case: Case, backend_name: str, device: str, golden: Golden | None = None) -> CaseResult:
    """Build, run on the backend, compute the reference (or take the golden's), compare. Never raises."""
    start = time.perf_counter()
    result = CaseResult(backend_name, case.id, case.op, "error", device=device)
    backend = registry.get_backend(backend_name)
    hook = get_operator(case.op).hook
    if backend is not None and not backend.implements(hook):
        result.status = "unsupported"
        planned = hook in backend.planned_hooks()
        result.reason = f"{case.op} is not implemented yet ({hook} is marked @not_implemented_yet)" if planned else f"{backend_name} does not implement {case.op}"
        return result
    try:
        if golden is None:
            inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
            expected = on_cpu(case.family.expect(copied_to(inputs, device)))
        else:
            inputs, expected = golden.inputs, golden.outputs
    except Exception as exc:  # a harness failure must be visible, not a pass
        result.reason = f"harness could not prepare the case: {_describe(exc)}"
        return result
    try:
        with use_backend(backend_name):
            got = case.family.run(copied_to(inputs, device))
        if device == "cuda":
            torch.cuda.synchronize()
    except OperatorNotSupportedError as exc:  # a feature of the operator the backend says it lacks
        result.status = "unsupported"
        result.reason = str(exc)
        result.seconds = time.perf_counter() - start
        return result
    except Exception as exc:
        result.reason = _describe(exc)
        result.seconds = time.perf_counter() - start
        return result
    try:
        result.measurements = case.family.compare(on_cpu(got), expected, inputs)
    except Exception as exc:
        result.reason = f"outputs could not be compared: {_describe(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    result.status = "pass" if result.measurements and all(m.passed for m in result.measurements) else "fail"
    failed = [m for m in result.measurements if not m.passed]
    if failed:
        result.reason = "; ".join(f"{m.output}: {m.note or f'{m.metric} {m.value:.3g} >= {m.threshold:g}'}" for m in failed)
    result.seconds = time.perf_counter() - start
    return result


def _run_with_timeout(case: Case, backend_name: str, device: str, timeout: float, golden: Golden | None) -> CaseResult:
    box: list[CaseResult] = []
    worker = threading.Thread(target=lambda: box.append(execute(case, backend_name, device, golden)), daemon=True, name=f"hal-case-{case.id}")
    worker.start()
    worker.join(timeout)
    if box:
        return box[0]
    return CaseResult(backend_name, case.id, case.op, "timeout", timeout, f"no result within {timeout:g} s (case left running in a background thread; use --isolate to kill hangs)", device)


def run_backend(
    backend_name: str,
    cases: Sequence[Case],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    isolate: bool = False,
    golden_dir: Path | None = None,
    progress: Progress | None = None,
) -> list[CaseResult]:
    """Run ``cases`` on one backend; every case yields exactly one result.

    With ``golden_dir`` each case runs on the recorded inputs and is judged against the recorded
    outputs (see :mod:`hal.conformance.golden`) instead of the reference.
    """
    device = pick_device(backend_name)
    if isolate:
        return _run_isolated(backend_name, device, cases, timeout, golden_dir, progress)
    goldens = load_goldens(golden_dir)[1] if golden_dir is not None else None
    results = []
    for case in cases:
        if goldens is not None and case.id not in goldens:
            result = CaseResult(backend_name, case.id, case.op, "error", reason=f"no golden recorded for this case in {golden_dir}", device=device)
        else:
            result = _run_with_timeout(case, backend_name, device, timeout, goldens[case.id] if goldens is not None else None)
        results.append(result)
        if progress:
            progress(result)
    return results


def _reader(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _start_worker(backend_name: str, device: str, cases: Sequence[Case], golden_dir: Path | None) -> tuple[subprocess.Popen, queue.Queue, list[str]]:
    # Results travel on a pipe of their own: whatever the backend prints to stdout or stderr
    # (a chatty driver, a debug print) cannot corrupt them.
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "hal.conformance.worker", "--backend", backend_name, "--device", device, "--events-fd", str(write_end)]
    if golden_dir is not None:
        command += ["--golden", str(golden_dir)]
    try:
        child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", pass_fds=(write_end,)
        )
    finally:
        os.close(write_end)
    assert child.stdin is not None
    child.stdin.write(json.dumps([c.id for c in cases]))
    child.stdin.close()
    lines: queue.Queue = queue.Queue()
    errors: list[str] = []
    events = os.fdopen(read_end, "r", encoding="utf-8", errors="replace")
    threading.Thread(target=_reader, args=(events, lines), daemon=True).start()
    threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True).start()
    return child, lines, errors


def _drain(
    child: subprocess.Popen, lines: queue.Queue, errors: list[str], backend_name: str, device: str,
    pending: list[Case], timeout: float, progress: Progress | None,
) -> tuple[list[CaseResult], CaseResult | None]:
    """Collect a worker's results until it finishes, hangs or dies; the failure result, if any, comes last."""
    done: list[CaseResult] = []
    by_id = {c.id: c for c in pending}
    in_flight = pending[0]
    while len(done) < len(pending):
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            child.kill()
            child.wait()
            return done, CaseResult(backend_name, in_flight.id, in_flight.op, "timeout", timeout, f"no result within {timeout:g} s; worker killed", device)
        if line is None:
            code = child.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = " | ".join(e.strip() for e in errors[-5:] if e.strip())
            return done, CaseResult(backend_name, in_flight.id, in_flight.op, "crash", 0.0, f"worker died with {how}" + (f": {tail}" if tail else ""), device)
        try:
            event = json.loads(line)
        except ValueError:
            continue  # only the worker writes this pipe; a torn line cannot take the run down
        if event["event"] == "start":
            in_flight = by_id[event["case"]]
            continue
        result = CaseResult.from_json(event["result"])
        done.append(result)
        if progress:
            progress(result)
    child.wait()
    return done, None


def _run_isolated(
    backend_name: str, device: str, cases: Sequence[Case], timeout: float, golden_dir: Path | None, progress: Progress | None
) -> list[CaseResult]:
    results: list[CaseResult] = []
    pending = list(cases)
    while pending:
        child, lines, errors = _start_worker(backend_name, device, pending, golden_dir)
        done, failure = _drain(child, lines, errors, backend_name, device, pending, timeout, progress)
        results.extend(done)
        finished = {r.case_id for r in done}
        if failure is None:
            break
        results.append(failure)
        if progress:
            progress(failure)
        finished.add(failure.case_id)
        pending = [c for c in pending if c.id not in finished]
    return results
