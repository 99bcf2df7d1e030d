"""Prove a backend before it is chosen: its own operators, in a child process, against the reference.

A backend whose runtime can misbehave (a JIT compiler, a driver, an ICD loader) implements
``hal_backend_canary_key``: a string naming everything its runtime's behaviour depends on,
computed without initialising that runtime (library versions and files, device identity as the
OS reports it, the backend's kernel sources). Before such a backend is reported available, unihal
runs the canary: ``python -m hal.canary BACKEND`` executes the quick conformance cases of every
operator the backend implements and compares each with the reference under the conformance
thresholds. The child process takes every risk: a segfault, an abort inside a compiler, a hang or
a wrong number costs the probe, never the user's process, and the backend is then unavailable with
the reason (the runtime's own last words where it printed any).

The verdict is cached on disk, keyed by a hash of the backend's identity, its canary key and the
sources of the conformance cases and references that judge it, in
``$HAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/unihal``, else ``~/.cache/unihal``), so a machine
pays for the canary once per driver, runtime, device and unihal version; changing any of them
re-probes. A file lock makes concurrent processes (the ranks of one job) share one probe.

Environment: ``HAL_CANARY_TIMEOUT_S`` bounds the child (default 300 s: the first run compiles
every kernel); ``HAL_CANARY=0`` skips canaries and trusts the in-process probe (for a backend
author iterating on a crash under a debugger, never for deployment).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

__all__ = [
    "ENV_CACHE_DIR", "ENV_TIMEOUT", "ENV_ENABLED", "Verdict", "cache_dir", "verdict", "run_canary", "file_fingerprint",
    "sources_fingerprint", "canaries_enabled",
]

ENV_CACHE_DIR = "HAL_CACHE_DIR"
ENV_TIMEOUT = "HAL_CANARY_TIMEOUT_S"
ENV_ENABLED = "HAL_CANARY"
# Set in the child for the backend it proves, so that its own availability does not recurse.
ENV_PROVING = "HAL_CANARY_PROVING"
DEFAULT_TIMEOUT_S = 300.0
FORMAT = 1  # bump when the verdict file's layout or the canary's choice of cases changes


@dataclass(frozen=True)
class Verdict:
    """What a canary concluded.

    Attributes:
        passed: every canary case ran and matched the reference.
        reason: when not passed, why (crash signal and the runtime's last stderr lines, the
            case that computed a wrong answer, the timeout).
        device: the device the child ran on, in the backend's words.
        cases: ``"case id: status"`` for each case run.
        seconds: the child's wall time.
        checked_at: Unix time of the probe.
        key: the backend's canary key the verdict belongs to.
    """

    passed: bool
    reason: str
    device: str
    cases: tuple[str, ...]
    seconds: float
    checked_at: float
    key: str


def canaries_enabled() -> bool:
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where verdicts (and other per-machine facts) are kept."""
    explicit = os.environ.get(ENV_CACHE_DIR, "").strip()
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unihal"


def _timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value <= 24 * 3600):
        from hal.errors import ValueRangeError

        raise ValueRangeError("canary", ENV_TIMEOUT, "seconds in (0, 86400]", repr(text), f"Set {ENV_TIMEOUT} to e.g. 300.")
    return value


def file_fingerprint(path: str | os.PathLike) -> str:
    """``path:size:mtime_ns`` (or ``path:missing``): changes when a library or driver file is replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def sources_fingerprint(*directories: str | os.PathLike) -> str:
    """sha256 over the files of a backend's folders (kernel sources live in them): edits re-probe."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(directory)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _host_identity() -> str:
    """The CPU model and flags: a verdict from another host (or a VM migrated to one) is not reused."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "flags", "Features", "CPU implementer", "CPU part") and name not in fields:
            fields[name] = value.strip()
    return json.dumps(fields, sort_keys=True)


def _judge_fingerprint() -> str:
    """What the canary judges by (the cases, the references, the tolerances): a verdict reached
    under other criteria, as during development of unihal itself, is not reused."""
    import hal.conformance
    import hal.ops

    return sources_fingerprint(*hal.conformance.__path__, *hal.ops.__path__)


def _entry_path(backend_name: str, identity: str) -> Path:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return cache_dir() / "canary" / f"{backend_name}-{digest}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path, key: str) -> Verdict | None:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data["verdict"]["key"] != key:
            return None
        fields = data["verdict"]
        return Verdict(**{**fields, "cases": tuple(fields["cases"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: probe again


def _write(path: Path, verdict_: Verdict, identity: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "identity": identity, "verdict": asdict(verdict_)}, indent=2))
    os.replace(tmp, path)


def verdict(backend_name: str, source: str, key: str, *, log=None) -> Verdict:
    """The cached verdict for this backend and key, running the canary when there is none.

    Args:
        backend_name: the backend to prove.
        source: where it was loaded from (module and distribution version): part of the cache key.
        key: the backend's ``hal_backend_canary_key()``.
        log: callable taking one message, told when a probe starts (it can take a while).
    """
    from hal import __version__

    identity = json.dumps([FORMAT, backend_name, source, __version__, _judge_fingerprint(), sys.version, _host_identity(), key])
    path = _entry_path(backend_name, identity)
    with _locked(path):
        cached = _read(path, key)
        if cached is not None:
            return cached
        if log is not None:
            log(f"proving backend '{backend_name}' on this machine in a child process (once per driver and device; verdict cached in {path.parent})")
        result = run_canary(backend_name, key)
        with contextlib.suppress(OSError):  # a read-only cache costs a re-probe next time, nothing more
            _write(path, result, identity)
        return result


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _last_words(stderr: str, lines: int = 4) -> str:
    kept = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-600:]


def run_canary(backend_name: str, key: str, *, timeout: float | None = None) -> Verdict:
    """Run the canary child for ``backend_name`` now (no cache) and return its verdict."""
    timeout = _timeout() if timeout is None else timeout
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hal-canary-") as scratch:
        out = Path(scratch) / "verdict.json"
        env = dict(os.environ, **{ENV_PROVING: backend_name})
        command = [sys.executable, "-m", "hal.canary", backend_name, "--out", str(out)]
        try:
            child = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = _last_words(exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode(errors="replace"))
            return Verdict(False, f"canary did not finish within {timeout:g} s (raise {ENV_TIMEOUT} if its first compile is slow)" + (f": {tail}" if tail else ""), "", (), time.perf_counter() - start, time.time(), key)
        seconds = time.perf_counter() - start
        if out.exists():
            try:
                data = json.loads(out.read_text())
                return Verdict(bool(data["passed"]), str(data["reason"]), str(data["device"]), tuple(data["cases"]), seconds, time.time(), key)
            except (ValueError, KeyError, TypeError) as exc:
                return Verdict(False, f"canary wrote an unreadable verdict ({exc})", "", (), seconds, time.time(), key)
        tail = _last_words(child.stderr)
        return Verdict(False, f"canary process {_describe_exit(child.returncode)}" + (f": {tail}" if tail else ""), "", (), seconds, time.time(), key)


def proving(backend_name: str) -> bool:
    """True inside the canary child that proves ``backend_name``."""
    return os.environ.get(ENV_PROVING) == backend_name


def _canary_cases(backend) -> list:
    """The quick cases of every operator the backend implements: small, but every kernel variant
    (causal and not, s_q 1 and 2, ragged lengths, each GEMM layout, every cast) at the launch
    geometries the backend derives from its device's limits."""
    from hal.conformance.catalogue import select_cases
    from hal.operator import get_operator

    return [c for c in select_cases(quick=True) if backend.implements(get_operator(c.op).hook)]


def _child(backend_name: str, out: Path) -> int:
    from hal import registry
    from hal.conformance.devices import pick_device
    from hal.conformance.runner import execute

    backend = registry.get_backend(backend_name)
    if backend is None:
        print(f"no backend named {backend_name!r}", file=sys.stderr)
        return 2
    availability = backend.availability()
    if not availability.available:
        report = {"passed": False, "reason": availability.reason, "device": availability.device, "cases": []}
    else:
        device = pick_device(backend_name)
        lines, failures = [], []
        for case in _canary_cases(backend):
            print(f"canary: {case.id}", file=sys.stderr, flush=True)  # the last one names the case a crash hit
            result = execute(case, backend_name, device)
            lines.append(f"{case.id}: {result.status}")
            # "unsupported": the call uses a contract feature the backend does not declare, so
            # selection never hands it such a call; only a wrong or failed result condemns it.
            if result.status not in ("pass", "unsupported"):
                failures.append(f"{case.id}: {result.status}" + (f" ({result.reason})" if result.reason else ""))
        report = {
            "passed": not failures and bool(lines),
            "reason": ("wrong or failed results: " + "; ".join(failures)) if failures else ("" if lines else "the backend implements no operator"),
            "device": availability.device,
            "cases": lines,
        }
    out.write_text(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.canary", description="Prove one backend (run by unihal in a child process).")
    parser.add_argument("backend")
    parser.add_argument("--out", type=Path, required=True, help="where to write the verdict (JSON)")
    args = parser.parse_args(argv)
    os.environ[ENV_PROVING] = args.backend
    return _child(args.backend, args.out)


if __name__ == "__main__":
    sys.exit(main())
