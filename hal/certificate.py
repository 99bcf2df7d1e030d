"""Conformance certificates: what a backend was proven to compute, on which device, under which contracts.

``hal certify`` (``hal conformance --certify``) runs the catalogue and writes one certificate per
backend: its identity (name, package and version, the device it reported, its runtime key when it
has a canary, torch and unihal versions), each operator's contract version and the features the
backend declared, the tier, and per operator the cases run with their status and worst margin
(the worst error as a fraction of its threshold). An operator is *certified* when at least one of
its cases passed and none failed, errored, hung or crashed (cases needing a feature the backend
does not declare are unsupported: outside its claim, not against it). The file is canonical JSON whose ``sha256`` covers everything else,
kept in ``$HAL_CACHE_DIR/certificates/<backend>.json`` (see :func:`hal.canary.cache_dir`);
``hal certify --out DIR`` exports a copy, ``hal verify FILE`` re-checks one.

Selection reads them: with ``HAL_REQUIRE_CERTIFIED=1`` auto-selection passes over a backend that
is not certified for the operator on this identity and contract (``reference``, the contract
itself, needs none); a backend named in ``HAL_BACKEND`` still runs, with one warning. A certificate
goes *stale* when the backend's identity or an operator's contract or features change.
The check costs nothing per call: selection is cached, and certificates are read once per process.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hal import canary, env, registry
from hal.operator import OPERATORS

__all__ = [
    "ENV_REQUIRE", "FORMAT", "Certificate", "CertificateError", "identity", "build", "save", "load", "certificates_dir",
    "current", "status", "require_certified", "reload",
]

ENV_REQUIRE = "HAL_REQUIRE_CERTIFIED"
FORMAT = "unihal-certificate/1"
TRUSTED = ("reference",)  # the executable contract certifies itself


class CertificateError(ValueError):
    """A certificate file that is not one, or whose hash does not match its content."""


@dataclass(frozen=True)
class Certificate:
    """A loaded certificate (``data`` is its canonical content, ``sha256`` its hash)."""

    data: dict[str, Any]
    sha256: str

    @property
    def backend(self) -> str:
        return self.data["backend"]["name"]

    def certified_ops(self) -> set[str]:
        return {op for op, entry in self.data["operators"].items() if entry["certified"]}


def require_certified() -> bool:
    return env.get(ENV_REQUIRE).strip().lower() in ("1", "true", "yes", "on")


def certificates_dir() -> Path:
    return canary.cache_dir() / "certificates"


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(data)).hexdigest()


def identity(backend: registry.Backend) -> dict[str, Any]:
    """Everything a backend's results depend on that can be read without running a kernel."""
    availability = backend.availability()
    facts: dict[str, Any] = {
        "name": backend.name,
        "source": backend.source,
        "device": availability.device,
        "simulated": availability.simulated,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "unihal": _unihal_version(),
        "machine": platform.machine(),
    }
    if backend.verdict is not None:  # the runtime key its canary was proven under (driver, ICD, compiler...)
        facts["runtime_key"] = hashlib.sha256(backend.verdict.key.encode()).hexdigest()
    return facts


def _unihal_version() -> str:
    import hal

    return hal.__version__


def _contracts(backend: registry.Backend) -> dict[str, dict[str, Any]]:
    return {
        op.name: {"version": op.version, "features": sorted(backend.features(op))}
        for op in OPERATORS.values() if backend.implements(op.hook)
    }


def build(backend_name: str, results: Iterable[Any], tier: str) -> Certificate:
    """A certificate for ``backend_name`` from its conformance results (:class:`hal.conformance.case.CaseResult`)."""
    backend = registry.get_backend(backend_name)
    if backend is None:
        raise CertificateError(f"no backend named {backend_name!r}")
    operators: dict[str, dict[str, Any]] = {}
    contracts = _contracts(backend)
    for r in results:
        if r.backend != backend_name:
            continue
        entry = operators.setdefault(r.op, {"cases": {}, "certified": False, "worst_margin": 0.0})
        worst = r.worst()
        margin = None if worst is None or not worst.threshold else round(float(worst.value) / float(worst.threshold), 6)
        entry["cases"][r.case_id] = {"status": r.status, "margin": margin if margin is None or margin == margin else None, "reason": r.reason[:300]}
    for op, entry in operators.items():
        statuses = [c["status"] for c in entry["cases"].values()]
        # Cases needing a feature the backend does not declare are "unsupported": outside its claim, not against it.
        entry["certified"] = "pass" in statuses and all(s in ("pass", "unsupported") for s in statuses) and op in contracts
        margins = [c["margin"] for c in entry["cases"].values() if isinstance(c["margin"], float) and c["margin"] != float("inf")]
        entry["worst_margin"] = max(margins, default=0.0)
        entry["contract"] = contracts.get(op)
    data = {
        "format": FORMAT,
        "backend": identity(backend),
        "tier": tier,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "operators": operators,
    }
    data = json.loads(_canonical(data))  # the form that is hashed and stored (no non-JSON values)
    return Certificate(data, _sha(data))


def save(certificate: Certificate, directory: Path | None = None) -> Path:
    """Write ``<backend>.json`` (canonical content plus its hash) into ``directory`` (default: the cache)."""
    directory = directory or certificates_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{certificate.backend}.json"
    payload = dict(certificate.data, sha256=certificate.sha256)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, path)
    reload()
    return path


def load(path: Path) -> Certificate:
    """Read a certificate and check its hash; raises :class:`CertificateError` when tampered with."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CertificateError(f"{path}: not a readable certificate ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "sha256" not in payload:
        raise CertificateError(f"{path}: not a {FORMAT} certificate")
    claimed = payload.pop("sha256")
    actual = _sha(payload)
    if claimed != actual:
        raise CertificateError(f"{path}: content does not match its sha256 ({claimed[:12]} claimed, {actual[:12]} computed): it was altered")
    return Certificate(payload, claimed)


@functools.lru_cache(maxsize=None)
def _cached(directory: str, generation: int) -> dict[str, Certificate | str]:
    found: dict[str, Certificate | str] = {}
    folder = Path(directory)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                cert = load(path)
                found[cert.backend] = cert
            except CertificateError as exc:
                found[path.stem] = str(exc)
    return found


_generation = [0]


def reload() -> None:
    """Forget the certificates read so far (after writing one, or in tests)."""
    _generation[0] += 1


def current(backend_name: str) -> Certificate | str | None:
    """This machine's certificate for the backend, an error text for an unreadable one, or None."""
    return _cached(str(certificates_dir()), _generation[0] + registry.generation()).get(backend_name)


def status(backend: registry.Backend, op_name: str) -> str:
    """``certified``, ``not certified``, ``stale (why)`` or ``trusted`` (the reference) for one operator."""
    if backend.name in TRUSTED:
        return "trusted"
    cert = current(backend.name)
    if cert is None:
        return "not certified"
    if isinstance(cert, str):
        return f"not certified (unreadable certificate: {cert})"
    entry = cert.data["operators"].get(op_name)
    if entry is None or not entry["certified"]:
        return "not certified"
    now = identity(backend)
    changed = sorted(k for k in set(now) | set(cert.data["backend"]) if now.get(k) != cert.data["backend"].get(k) and k != "created")
    if changed:
        return "stale (" + ", ".join(changed) + " changed)"
    op = OPERATORS[op_name]
    contract = {"version": op.version, "features": sorted(backend.features(op))}
    if entry.get("contract") != contract:
        return "stale (contract or features changed)"
    return "certified"
