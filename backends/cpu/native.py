"""The cpu backend's native kernels (FP8 GEMMs, MLA decode, combine's reduction, the BF16 GEMMs' range scan, FP8 casts): a small C library built on this machine, loaded with ctypes.

The sources are ``native/fp8_gemm.c``, ``native/mla_decode.c``, ``native/ep_reduce.c``, ``native/bf16_range.c`` and ``native/fp8_cast.c`` beside this module (plain C11
with AVX-512 BF16 intrinsics where the compiler targets them, a portable C path elsewhere; their
headers say how they work) and ``native/parallel.h``, their work sharing (torch's OpenMP threads,
else a small pthread pool), compiled together into one library. It is
compiled once per machine, lazily, the first time a process needs it::

    $CC (else cc, gcc, clang) -O3 -march=native -std=c11 -ffp-contract=off -fopenmp -fPIC -shared -pthread

into ``$HAL_CACHE_DIR/cpu-native/<key>.so`` (the cache folder of :func:`hal.canary.cache_dir`),
where ``key`` hashes the source, the compiler's ``--version``, the flags and the CPU model and
flags from ``/proc/cpuinfo``: editing the source, changing the compiler or moving to another CPU
builds anew. With OpenMP the kernels run on torch's own intra-op threads (torch's wheel ships
libgomp.so.1, which the library then binds to). A compiler that refuses the flags is tried again
without ``-fopenmp`` (the kernels then use a small pthread pool of their own), then also without
``-march=native``. The library is written under a temporary name and renamed into place, so
processes building at once never load a half-written file. A failed build is recorded beside it
(``<key>.err``, the compiler's last words) so that later processes do not retry it; deleting
the folder retries.

No compiler, a failed build or ``HAL_CPU_NATIVE=0`` leaves the backend on its torch kernels
(:mod:`hal.backends.cpu.gemm_fp8`); :func:`describe` says which one runs, and why.

Native code can crash its process, so the backend names the library in its canary key
(:func:`canary_key`) and unihal runs it once in a child process (:mod:`hal.canary`) before
auto-selection may choose it. Only that child and processes that call the GEMMs load the library;
availability probes compile at most.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from hal import env
from hal.canary import ENV_CACHE_DIR, cache_dir, sources_fingerprint
from hal.ccompiler import BUILD_TIMEOUT_S as _BUILD_TIMEOUT_S
from hal.ccompiler import compile_library
from hal.ccompiler import compiler as _compiler
from hal.ccompiler import compiler_version as _compiler_version
from hal.ccompiler import cpu_identity as _cpu_identity
from hal.ccompiler import write_atomically as _write_atomically

__all__ = ["ENV_NATIVE", "SOURCES", "FLAGS", "Build", "enabled", "build", "library", "load", "describe", "canary_key", "expected_fast"]

ENV_NATIVE = "HAL_CPU_NATIVE"
# One library, one build: the FP8 GEMMs, MLA decode, the combine reduction, the BF16 GEMMs' range
# scan and the FP8 casts (each file self-contained, exporting only hal_fp8_*, hal_mla_*, hal_ep_*,
# hal_bf16_* and hal_cast_* symbols).
SOURCES = tuple(Path(__file__).parent / "native" / name for name in ("fp8_gemm.c", "mla_decode.c", "ep_reduce.c", "bf16_range.c", "fp8_cast.c"))
# Headers the sources include: part of the build key (an edit rebuilds), not of the command line.
HEADERS = tuple(Path(__file__).parent / "native" / name for name in ("parallel.h", "float_bits.h"))
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-pthread")
# The preprocessor symbols whose presence selects the fast path in fp8_gemm.c (HAL_FAST).
_FAST_MACROS = ("__AVX512F__", "__AVX512BW__", "__AVX512VBMI__", "__AVX512BF16__")
_FAST_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vbmi", "avx512_bf16")


def enabled() -> bool:
    """False when ``HAL_CPU_NATIVE`` is 0 (or false/no/off): the torch kernels run."""
    return os.environ.get(ENV_NATIVE, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        try:
            content = source.read_bytes()
        except OSError:  # a broken install: the build then fails and says which file, where raising here would reach selection
            content = b"missing"
        digest.update(source.name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()


def _key(cc: tuple[str, ...], version: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in (_source_digest(), " ".join(cc), version, " ".join(flags), _cpu_identity()[0]):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Build:
    """The outcome of building the library on this machine.

    Attributes:
        path: the shared library, or None when there is none.
        reason: why there is none (no compiler, the compiler's last words).
        compiler: ``"gcc 12.2.0"``.
        kernels: ``"avx512_bf16"`` (the fast path) or ``"portable C"``.
    """

    path: Path | None
    reason: str = ""
    compiler: str = ""
    kernels: str = ""


def _fast_macros(cc: tuple[str, ...], flags: tuple[str, ...]) -> bool:
    """Whether the compiler, with these flags, defines every macro the fast path needs."""
    query = [f for f in flags if f not in ("-shared", "-fPIC")]
    try:
        done = subprocess.run([*cc, *query, "-dM", "-E", "-x", "c", os.devnull], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=_BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return False
    defined = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ") and len(line.split()) > 1}
    return done.returncode == 0 and all(m in defined for m in _FAST_MACROS)


def _compile(cc: tuple[str, ...], flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCES into ``target`` (atomically); None on success, else the compiler's last words."""
    return compile_library(cc, flags, SOURCES, target, _BUILD_TIMEOUT_S)


def build(*, flags: tuple[str, ...] = FLAGS, folder: Path | None = None) -> Build:
    """The library for these flags, compiled now unless the cache has it (never loaded here).

    ``flags`` other than :data:`FLAGS` serve tests (the portable path: ``-mno-avx512bf16``)."""
    cc = _compiler()
    if cc is None:
        return Build(None, "no C compiler (set CC, or install gcc or clang)")
    found = _compiler_version(cc)
    if found is None:
        return Build(None, f"the C compiler {' '.join(cc)!r} does not run ({' '.join(cc)} --version failed)")
    version, short = found
    folder = folder or cache_dir() / "cpu-native"
    key = _key(cc, version, flags)
    library_path, info_path, error_path = folder / f"{key}.so", folder / f"{key}.json", folder / f"{key}.err"
    try:
        if library_path.exists() and info_path.exists():
            return Build(library_path, compiler=short, kernels=json.loads(info_path.read_text())["kernels"])
        if error_path.exists():
            return Build(None, error_path.read_text(errors="replace").strip(), compiler=short)
    except (OSError, ValueError, KeyError):
        pass  # unreadable: build again
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return Build(None, f"cannot create {folder}: {exc}", compiler=short)
    # Without OpenMP (Apple's clang): the pthread pool; then without -march=native (compilers that lack it).
    attempts = [flags, tuple(f for f in flags if f != "-fopenmp"), tuple(f for f in flags if f not in ("-fopenmp", "-march=native"))]
    failure: str | None = None  # the first attempt's, the one with every flag
    for used in dict.fromkeys(attempts):
        error = _compile(cc, used, library_path)
        if error is None:
            failure = None
            break
        failure = failure or error
    kernels = "avx512_bf16" if failure is None and _fast_macros(cc, used) else "portable C"
    try:
        if failure is not None:
            reason = f"build failed: {failure}"
            _write_atomically(error_path, reason.encode())
            return Build(None, reason, compiler=short)
        _write_atomically(info_path, json.dumps({"kernels": kernels, "compiler": short, "flags": list(used)}).encode())
    except OSError as exc:  # a read-only cache: the library may still be there
        if failure is not None:
            return Build(None, f"build failed: {failure}", compiler=short)
        if not library_path.exists():
            return Build(None, f"cannot write to {folder}: {exc}", compiler=short)
    return Build(library_path, compiler=short, kernels=kernels)


_lock = threading.Lock()
_built: dict[tuple, Build] = {}
_loaded: dict[Path, ctypes.CDLL | str] = {}


def _current_build() -> Build:
    """This process's build for the current compiler and cache folder (computed once each)."""
    marker = (os.environ.get("CC", ""), str(cache_dir()))
    with _lock:
        if marker not in _built:
            _built[marker] = build()
        return _built[marker]


def _load(path: Path) -> ctypes.CDLL | str:
    """The loaded library with its signatures declared, or why it could not be loaded."""
    with _lock:
        if path not in _loaded:
            try:
                lib = ctypes.CDLL(str(path))
                c_long, c_int, c_void_p = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
                lib.hal_fp8_gemm.argtypes = [c_void_p, c_long, c_void_p, c_void_p, c_long, c_void_p, c_int, c_void_p, c_long, c_int, c_long, c_long,
                                             c_long, c_int]
                lib.hal_fp8_gemm.restype = c_int
                lib.hal_fp8_path.argtypes = []
                lib.hal_fp8_path.restype = ctypes.c_char_p
                lib.hal_mla_path.argtypes = []
                lib.hal_mla_path.restype = ctypes.c_char_p
                lib.hal_bf16_has_tiny.argtypes = [c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, c_int]
                lib.hal_bf16_has_tiny.restype = c_int
                for cast in (lib.hal_cast_per_token, lib.hal_cast_per_block):
                    cast.argtypes = [c_void_p, c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, c_void_p, c_void_p, c_int]
                    cast.restype = c_int
                lib.hal_cast_mla_kv_cache.argtypes = [c_void_p, c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, c_void_p, c_int]
                lib.hal_cast_mla_kv_cache.restype = c_int
                _loaded[path] = lib
            except (OSError, AttributeError) as exc:
                _loaded[path] = f"the built library does not load: {exc}"
        return _loaded[path]


# What library() depends on, read as stored (one dict lookup each): HAL_CPU_NATIVE, the compiler
# and the cache folder's variables. Resolving them (parsing the switch, building the cache path)
# cost about 5 us on every kernel call.
_INPUTS = tuple(env.reader(name) for name in (ENV_NATIVE, "CC", ENV_CACHE_DIR, "XDG_CACHE_HOME", "HOME"))
_resolved: dict[tuple, ctypes.CDLL | None] = {}


def library() -> ctypes.CDLL | None:
    """The native kernels, built and loaded on first use; None when they are off or unavailable.
    Called on every kernel call: the answer is kept per value of the variables it depends on."""
    key = tuple(read() for read in _INPUTS)
    found = _resolved.get(key, _resolved)
    if found is not _resolved:
        return found  # type: ignore[return-value]
    lib = _library()
    if len(_resolved) > 16:
        _resolved.clear()
    _resolved[key] = lib
    return lib


def _library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    built = _current_build()
    if built.path is None:
        return None
    lib = _load(built.path)
    return lib if isinstance(lib, ctypes.CDLL) else None


def load(built: Build) -> ctypes.CDLL:
    """Load a given build (tests load the portable build beside the default one)."""
    assert built.path is not None, built.reason
    lib = _load(built.path)
    if isinstance(lib, str):
        raise OSError(lib)
    return lib


def describe(threads: int, *, try_load: bool = False) -> tuple[bool, str]:
    """``(native, words)``: whether the GEMMs run on the native kernels, and the device string
    ``hal backends`` shows. Builds the library when needed; loads it only when ``try_load``."""
    if not enabled():
        return False, f"torch kernels ({ENV_NATIVE}=0)"
    built = _current_build()
    if built.path is None:
        return False, f"torch kernels (native kernels unavailable: {built.reason})"
    if try_load:
        lib = _load(built.path)
        if isinstance(lib, str):
            return False, f"torch kernels ({lib})"
    return True, f"native kernels: fp8 GEMMs, MLA decode, combine reduce ({built.compiler}, {built.kernels}, {threads} threads)"


def expected_fast() -> bool:
    """Cheap (no build): whether the native fast path is expected to run here, so that the
    backend may rank above opencl. True when the kernels are on, a compiler is found, the CPU has
    AVX-512 BF16 and VBMI, and no build on this machine has failed or produced the portable path."""
    if not enabled():
        return False
    cc = _compiler()
    if cc is None or not all(flag in _cpu_identity()[1] for flag in _FAST_CPU_FLAGS):
        return False
    found = _compiler_version(cc)
    if found is None:
        return False
    folder = cache_dir() / "cpu-native"
    key = _key(cc, found[0], FLAGS)
    if (folder / f"{key}.err").exists():
        return False
    try:
        return json.loads((folder / f"{key}.json").read_text()).get("kernels") == "avx512_bf16"
    except FileNotFoundError:
        return True  # not built yet: the CPU and the compiler say it will be
    except (OSError, ValueError, AttributeError):
        return True


def canary_key() -> str:
    """What the native kernels' behaviour depends on: the switch, the compiler, the flags, the CPU
    and the backend's sources (the C file included)."""
    cc = _compiler()
    version = _compiler_version(cc) if cc else None
    return "\n".join([
        f"{ENV_NATIVE}={os.environ.get(ENV_NATIVE, '')}",
        f"compiler {' '.join(cc) if cc else 'none'}: {version[0] if version else 'does not run'}",
        "flags " + " ".join(FLAGS),
        "cpu " + _cpu_identity()[0],
        "sources " + sources_fingerprint(Path(__file__).parent),
    ])
