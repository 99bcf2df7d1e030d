"""This machine's C compiler, for the small C libraries unihal builds where it runs.

Two libraries are built this way: the core's value checks (:mod:`hal.compiled_checks`) and the cpu
backend's kernels (:mod:`hal.backends.cpu.native`). Both are compiled lazily, once per machine,
into the cache folder (:func:`hal.canary.cache_dir`), under a name that hashes what the library
depends on, so that an edited source, another compiler or another CPU builds anew. Here are the
parts they share: finding the compiler, asking its version, reading the CPU's identity, compiling
sources into a file atomically (processes building at once never load a half-written library),
and writing small files atomically.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUILD_TIMEOUT_S", "compiler", "compiler_version", "cpu_identity", "compile_library", "tail", "write_atomically", "unlink_quietly"]

BUILD_TIMEOUT_S = 120


def compiler() -> tuple[str, ...] | None:
    """``$CC`` (split as a shell would), else the first of cc, gcc, clang on PATH."""
    explicit = os.environ.get("CC", "").strip()
    if explicit:
        return tuple(shlex.split(explicit))
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return (found,)
    return None


@functools.lru_cache(maxsize=8)
def compiler_version(cc: tuple[str, ...]) -> tuple[str, str] | None:
    """``(cc --version output, "gcc 12.2.0")``, or None when it does not run."""
    try:
        done = subprocess.run([*cc, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    text = done.stdout.strip()
    first = text.splitlines()[0] if text else ""
    family = "clang" if "clang" in first.lower() else "gcc" if ("gcc" in first.lower() or "free software foundation" in text.lower()) else Path(cc[0]).name
    numbers = re.findall(r"\d+\.\d+(?:\.\d+)?", first)
    return text, f"{family} {numbers[-1]}" if numbers else family


@functools.lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, frozenset[str]]:
    """The CPU's model and flags as ``/proc/cpuinfo`` has them (the platform's name elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + " " + platform.processor(), frozenset()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "flags", "Features", "CPU implementer", "CPU part") and name not in fields:
            fields[name] = value.strip()
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return json.dumps(fields, sort_keys=True), flags


def tail(text: str, lines: int = 6) -> str:
    """A compiler's last words, on one line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-800:]


def unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def compile_library(cc: tuple[str, ...], flags: Sequence[str], sources: Sequence[Path], target: Path, timeout_s: float = BUILD_TIMEOUT_S) -> str | None:
    """Compile ``sources`` with ``flags`` into the shared library ``target`` (written under a
    temporary name and renamed into place); None on success, else why not (the compiler's last
    words)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        try:
            done = subprocess.run([*cc, *flags, "-o", tmp, *map(str, sources), "-lm"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cc)} did not finish within {timeout_s:g} s"
        except OSError as exc:
            return f"{' '.join(cc)} could not run: {exc}"
        if done.returncode != 0:
            return f"{' '.join(cc)} exit code {done.returncode}: {tail(done.stderr or done.stdout)}"
        os.replace(tmp, target)
        return None
    finally:
        unlink_quietly(tmp)
