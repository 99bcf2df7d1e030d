"""Golden vectors: inputs and outputs recorded from a chosen backend, checked later on any backend.

Format (``unihal-golden/1``), one directory:

- ``<case>.safetensors`` per case: tensors ``input.<name>`` and ``output.<name>``;
- ``manifest.json``: the recording (backend, device, driver and library versions, date) and per
  case its file, sha256, parameters, seed and the non-tensor inputs (``scalars``) and outputs
  that were None. No pickle: safetensors holds tensors, JSON everything else.

Goldens recorded from DeepSeek's own kernels on a Hopper GPU pin the real hardware numerics;
goldens recorded from the reference pin the reference itself against regressions.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hal.conformance.case import Case, Tensors, copied_to
from hal.conformance.report import environment
from hal.conformance.devices import pick_device
from hal.errors import HalError
from hal.selection import use_backend

__all__ = ["FORMAT", "GoldenError", "Golden", "record", "load_goldens"]

FORMAT = "unihal-golden/1"
MANIFEST = "manifest.json"


class GoldenError(HalError, ValueError):
    """A golden directory that is missing, malformed or altered since it was recorded."""


@dataclass(frozen=True)
class Golden:
    """One recorded case: the inputs it was run on and the outputs the recording backend gave."""

    case_id: str
    inputs: Tensors
    outputs: Tensors


def _file_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", case_id) + ".safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(backend: str, cases: Sequence[Case], directory: Path) -> Path:
    """Run ``cases`` on ``backend`` and write them with their outputs into ``directory``; return the manifest path."""
    device = pick_device(backend)
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for case in cases:
        inputs = case.family.build(case.params, torch.Generator().manual_seed(case.seed))
        on_device = copied_to(inputs, device)
        with use_backend(backend):
            outputs = case.family.run(on_device)
        tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        tensors |= {f"output.{k}": v.detach().cpu().contiguous() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        path = directory / _file_name(case.id)
        save_file(tensors, str(path))
        entries[case.id] = {
            "file": path.name,
            "sha256": _sha256(path),
            "params": dict(case.params),
            "seed": case.seed,
            "scalars": {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)},
            "none_outputs": [k for k, v in outputs.items() if v is None],
        }
    manifest = {"format": FORMAT, "recorded_with": {"backend": backend, "device": device, "environment": environment()}, "cases": entries}
    manifest_path = directory / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def _entry_problem(case_id: object, entry: object) -> str | None:
    """What is malformed about one manifest entry, or None."""
    if not isinstance(case_id, str) or not isinstance(entry, dict):
        return "an entry must map a case id to an object"
    expected = {"file": str, "sha256": str, "scalars": dict, "none_outputs": list}
    for key, kind in expected.items():
        if key not in entry:
            return f"missing {key!r}"
        if not isinstance(entry[key], kind):
            return f"{key!r} is a {type(entry[key]).__name__}, not a {kind.__name__}"
    name = entry["file"]
    # A golden file is a plain name inside the golden directory: no separators, no parent
    # references, nothing absolute. Anything else could read files the recording never wrote.
    if name != Path(name).name or name in ("", ".", "..") or "\\" in name or not name.endswith(".safetensors"):
        return f"'file' must be a plain *.safetensors name inside the golden directory, not {name!r}"
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return "'sha256' must be 64 lower-case hex digits"
    return None


def load_goldens(directory: Path) -> tuple[dict[str, Any], dict[str, Golden]]:
    """Read and verify a golden directory; raise :class:`GoldenError` on any mismatch.

    Every file a manifest names must be a plain name inside ``directory`` (no path, no ``..``,
    no link leading out of it) whose sha256 matches; a malformed manifest is a GoldenError that
    says which entry and what is wrong, never a JSONDecodeError, KeyError or TypeError.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise GoldenError(f"{directory}: no {MANIFEST}; record goldens with `hal conformance record --backend NAME --out {directory}`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise GoldenError(f"{manifest_path}: not valid JSON ({exc}); re-record the goldens") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise GoldenError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("cases"), dict):
        raise GoldenError(f"{manifest_path}: 'cases' must be an object mapping case ids to entries")
    root = directory.resolve()
    goldens = {}
    for case_id, entry in manifest["cases"].items():
        problem = _entry_problem(case_id, entry)
        if problem is not None:
            raise GoldenError(f"{manifest_path}: case {case_id!r}: {problem}")
        path = directory / entry["file"]
        if path.resolve().parent != root:
            raise GoldenError(f"{manifest_path}: case {case_id!r}: {entry['file']!r} leads outside {directory}")
        if not path.is_file():
            raise GoldenError(f"{case_id}: the golden file {entry['file']!r} is missing from {directory}")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise GoldenError(f"{case_id}: {path.name} has sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...; the file was altered")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on a corrupt header
            raise GoldenError(f"{case_id}: {path.name} is not a readable safetensors file ({exc})") from None
        inputs: Tensors = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
        inputs |= entry["scalars"]
        outputs: Tensors = {k.removeprefix("output."): v for k, v in tensors.items() if k.startswith("output.")}
        outputs |= {k: None for k in entry["none_outputs"]}
        goldens[case_id] = Golden(case_id, inputs, outputs)
    return manifest, goldens
