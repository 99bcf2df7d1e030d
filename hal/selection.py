"""Which backend runs an operator: environment variables, code scopes, fallback chains, auto.

Precedence, first match wins:

1. the innermost :func:`use_backend` scope that covers the operator (code is explicit and local);
2. ``HAL_BACKEND_<OPERATOR>`` (e.g. ``HAL_BACKEND_MLA_DECODE=opencl``);
3. ``HAL_BACKEND``;
4. automatic: the highest-priority available backend that implements the operator for the
   device the inputs live on.

A value is one backend name or a comma-separated fallback chain (``cuda,reference``); ``auto``
may appear in a chain and stands for step 4. A single name is a demand: if that backend is
unavailable, lacks the operator or cannot take the inputs' device, a typed error says so and
nothing else runs. In a chain, each skipped backend is logged once (logger ``hal``).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hal import certificate, env, registry
from hal.errors import BackendUnavailableError, DeviceError, FeatureNotSupportedError, OperatorNotSupportedError, UnknownBackendError
from hal.operator import OPERATORS, Operator, get_operator
from hal.registry import Backend

__all__ = ["ENV_BACKEND", "AUTO", "Selection", "use_backend", "select", "parse_chain", "honoured_variables", "unknown_variables", "carry_backend"]

ENV_BACKEND = "HAL_BACKEND"
AUTO = "auto"

log = logging.getLogger("hal")
T = TypeVar("T")

# Stack of (operator name or None for every operator, chain, how it was written).
_scopes: contextvars.ContextVar[tuple[tuple[str | None, tuple[str, ...], str], ...]] = contextvars.ContextVar(
    "hal_backend_scopes", default=()
)


@dataclass(frozen=True)
class Selection:
    """The outcome of selecting a backend for one operator and device type.

    Attributes:
        op: the operator.
        device_type: torch device type of the inputs (``"cpu"``, ``"cuda"``...).
        backend: the backend that runs it.
        source: what asked for it: ``"HAL_BACKEND=cuda,reference"``, ``"use_backend('x')"``, ``"auto"``.
        skipped: ``"name: why"`` for each earlier candidate that could not serve.
    """

    op: Operator
    device_type: str
    backend: Backend
    source: str
    skipped: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        if self.source == AUTO:
            text = f"auto: highest-priority available backend for {self.device_type} tensors"
            if self.skipped:  # the reasons are in each backend's availability; names suffice here
                text += " (passed over: " + ", ".join(s.split(":", 1)[0] for s in self.skipped) + ")"
            return text
        if self.skipped:
            return f"{self.source}; skipped " + "; ".join(self.skipped)
        return self.source


def parse_chain(text: str | Sequence[str], *, source: str) -> tuple[str, ...]:
    """Split ``"cuda, reference"`` into names and check each is a discovered backend (or ``auto``)."""
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
    if not names:
        raise UnknownBackendError(f"{source}: empty backend name; known backends: {_known()}")
    known = registry.backends()
    for name in names:
        if name != AUTO and name not in known:
            raise UnknownBackendError(
                f"{source}: unknown backend {name!r}. Known backends: {_known()} (or '{AUTO}'). "
                "A backend is known once a package registers it under the 'hal.backends' entry-point group; "
                "`hal backends` lists them."
            )
    return names


def _known() -> str:
    return ", ".join(sorted(registry.backends())) or "(none installed)"


def _available_names() -> str:
    names = [b.name for b in registry.backends().values() if b.available]
    return ", ".join(sorted(names)) or "(none)"


@contextlib.contextmanager
def use_backend(spec: str | Sequence[str], *, op: str | None = None) -> Iterator[None]:
    """Run the enclosed code with ``spec`` (a name or fallback chain) selected.

    Args:
        spec: ``"reference"``, ``"cuda,reference"`` or a list of names.
        op: restrict the scope to one operator (``"mla_decode"``); default: every operator.

    Scopes nest (the innermost covering scope wins), are per thread and per asyncio task, and
    take precedence over the environment variables. Threads started inside a scope do not inherit
    it: wrap their callables with :func:`carry_backend`.
    """
    operator = get_operator(op).name if op is not None else None
    shown = spec if isinstance(spec, str) else ",".join(spec)
    where = f"use_backend({shown!r}" + (f", op={op!r})" if op else ")")
    names = parse_chain(spec, source=where)
    token = _scopes.set(_scopes.get() + ((operator, names, where),))
    try:
        yield
    finally:
        _scopes.reset(token)


def carry_backend(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` bound to the :func:`use_backend` scopes active where this is called.

    Scopes live in a context variable: they follow the code that entered them, across ``await``
    and into asyncio tasks, but a thread (``threading.Thread``, a ``ThreadPoolExecutor`` worker)
    starts without them and selects by the environment. Wrap what you hand to a thread::

        with hal.use_backend("reference"):
            pool.submit(hal.carry_backend(step), batch)   # step runs on reference too
    """
    scopes = _scopes.get()

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> T:
        token = _scopes.set(scopes)
        try:
            return fn(*args, **kwargs)
        finally:
            _scopes.reset(token)

    return bound


def _requested(op: Operator) -> tuple[tuple[str, ...] | None, str]:
    for scope_op, names, where in reversed(_scopes.get()):
        if scope_op is None or scope_op == op.name:
            return names, where
    for var in (op.env_var, ENV_BACKEND):
        value = env.get(var).strip()
        if value:
            source = f"{var}={value}"
            return parse_chain(value, source=source), source
    return None, AUTO


def _missing(backend: Backend, op: Operator, features: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(features - backend.features(op)))


def _why_not(
    backend: Backend, op: Operator, device_type: str, features: frozenset[str] = frozenset(), certified_only: bool = False
) -> str | None:
    if not backend.available:
        return f"unavailable ({backend.availability().reason})"
    if not backend.implements(op.hook):
        return f"does not implement {op.name}"
    if not backend.accepts_device(device_type):
        accepted = ", ".join(backend.info.device_types or ()) if backend.info else ""
        return f"takes {accepted} tensors, not {device_type}"
    missing = _missing(backend, op, features)
    if missing:
        return f"lacks feature {', '.join(missing)}"
    if certified_only:
        state = certificate.status(backend, op.name)
        if state not in ("certified", "trusted"):
            return f"{state} for {op.name} ({certificate.ENV_REQUIRE}=1; run: hal certify --backend {backend.name})"
    return None


def _auto_order() -> list[Backend]:
    return sorted(registry.backends().values(), key=lambda b: (-b.priority, b.name))


def honoured_variables() -> dict[str, str]:
    """The selection variables set in this environment that name an operator (or ``HAL_BACKEND``)."""
    names = [ENV_BACKEND] + [op.env_var for op in OPERATORS.values()]
    return {var: os.environ[var] for var in names if os.environ.get(var, "").strip()}


def unknown_variables() -> dict[str, str]:
    """``HAL_BACKEND_<X>`` variables whose ``X`` is no operator, each with the closest operator's variable."""
    prefix = ENV_BACKEND + "_"
    known = {op.env_var: op for op in OPERATORS.values()}
    found = {}
    for var in os.environ:
        if var.startswith(prefix) and var not in known:
            close = difflib.get_close_matches(var, list(known), n=1, cutoff=0.0)
            found[var] = close[0] if close else ""
    return found


@functools.lru_cache(maxsize=1)
def _warn_unknown_variables_once() -> None:
    for var, closest in unknown_variables().items():
        log.warning(
            "hal: %s=%s names no operator and is ignored; did you mean %s? (operators: %s)",
            var, os.environ.get(var, ""), closest, ", ".join(sorted(OPERATORS)),
        )


_NO_FEATURES: frozenset[str] = frozenset()


def select(
    op: Operator | str, device_type: str = "cpu", *, device_arg: str = "inputs", features: Iterable[str] = ()
) -> Selection:
    """Select the backend for ``op`` on tensors of ``device_type``; raise a typed error if none can.

    Args:
        op: the operator or its name.
        device_type: ``tensor.device.type`` of the inputs.
        device_arg: the argument whose device was inspected, named in device errors.
        features: the optional contract features the call uses (:class:`hal.operator.Feature`);
            only backends that declare all of them are candidates.
    """
    operator = op if isinstance(op, Operator) else get_operator(op)
    required = frozenset(features) if features else _NO_FEATURES
    if device_type == "meta":
        raise DeviceError(
            operator.name, device_arg, "a tensor with data (cpu, cuda, ...)", "a tensor on the meta device",
            "Meta tensors carry no values to compute with. For shape inference, trace under torch.compile "
            "or FakeTensorMode through the torch.ops.hal custom ops, which have fake implementations; "
            "otherwise pass real tensors.",
        )
    # The last selection for this call's key is reused while nothing it depends on changed: the
    # scopes, the two selection variables, HAL_REQUIRE_CERTIFIED (compared as stored, undecoded)
    # and the registry. Reading them so costs a third of parsing them (this runs on every call).
    readers = _READERS.get(operator)
    if readers is None:
        readers = _READERS[operator] = env.reader(operator.env_var)
    state = (_scopes.get(), readers(), _read_backend(), _read_require(), registry.generation())
    key = (operator, device_type, device_arg, required)
    recent = _RECENT.get(key)
    if recent is not None and recent[0] == state:
        return recent[1]
    _warn_unknown_variables_once()
    chain, source = _requested(operator)
    selection = _select_cached(operator, device_type, device_arg, chain, source, required, certificate.require_certified(), registry.generation())
    if len(_RECENT) > 512:
        _RECENT.clear()
    _RECENT[key] = (state, selection)
    return selection


_READERS: dict[Operator, Callable[[], Any]] = {}
_RECENT: dict[tuple[Any, ...], tuple[tuple[Any, ...], Selection]] = {}
_read_backend = env.reader(ENV_BACKEND)
_read_require = env.reader(certificate.ENV_REQUIRE)


@functools.lru_cache(maxsize=512)
def _select_cached(
    op: Operator, device_type: str, device_arg: str, chain: tuple[str, ...] | None, source: str, features: frozenset[str],
    certified_only: bool, _generation: int,
) -> Selection:
    for name in features:
        op.feature(name)  # an unknown name is a unihal bug: fail loudly (never cached: errors are not)
    known = registry.backends()
    explicit = chain is not None
    candidates: list[Backend] = []
    for name in chain or (AUTO,):
        candidates.extend(_auto_order() if name == AUTO else [known[name]])
    skipped: list[str] = []
    seen: set[str] = set()
    for backend in candidates:
        if backend.name in seen:
            continue
        seen.add(backend.name)
        # Certificates gate auto-selection only: a backend the user names still runs (with a warning).
        why = _why_not(backend, op, device_type, features, certified_only and not explicit)
        if why is None:
            selection = Selection(op, device_type, backend, source, tuple(skipped))
            state = certificate.status(backend, op.name) if explicit and certified_only else "certified"
            if state not in ("certified", "trusted"):
                log.warning("hal: %s runs on '%s' (selected by %s), which is %s for it on this machine", op.name, backend.name, source, state)
            if explicit and skipped:
                log.warning("hal: %s on %s tensors runs on '%s' (%s)", op.name, device_type, backend.name, selection.reason)
            elif any("lacks feature" in s for s in skipped):  # auto, but never silently slower: once per (op, features)
                log.warning(
                    "hal: %s calls using %s on %s tensors run on '%s'; passed over: %s",
                    op.name, ", ".join(sorted(features)), device_type, backend.name, "; ".join(s for s in skipped if "lacks feature" in s),
                )
            return selection
        skipped.append(f"{backend.name}: {why}")
    raise _no_backend_error(op, device_type, device_arg, source, candidates, skipped, features)


def _no_backend_error(
    op: Operator, device_type: str, device_arg: str, source: str, candidates: list[Backend], skipped: list[str],
    features: frozenset[str] = frozenset(),
) -> Exception:
    capable = sorted(
        b.name for b in registry.backends().values() if _why_not(b, op, device_type, features) is None
    )
    alternatives = ", ".join(capable) or "(none)"
    if len(candidates) == 1:
        backend = candidates[0]
        if not backend.available:
            return BackendUnavailableError(
                f"{op.name}: backend '{backend.name}' (selected by {source}) is unavailable: "
                f"{backend.availability().reason}. Available backends: {_available_names()}. "
                f"Select one of them, or give a fallback chain such as '{backend.name},reference'."
            )
        if not backend.implements(op.hook):
            return OperatorNotSupportedError(
                f"{op.name}: backend '{backend.name}' (selected by {source}) does not implement this operator. "
                f"Backends that can run it on {device_type} tensors: {alternatives}; "
                f"set {op.env_var}=<one of them> to override this operator alone."
            )
        missing = _missing(backend, op, features)
        if missing and backend.accepts_device(device_type):
            described = "; ".join(f"{name} ({op.feature(name).summary})" for name in missing)
            return FeatureNotSupportedError(
                op.name, backend.name, missing, tuple(capable),
                f"{op.name}: backend '{backend.name}' (selected by {source}) implements {op.name} but not the "
                f"feature(s) this call uses: {described}. Backends that declare them for {device_type} tensors: "
                f"{alternatives}; set {op.env_var}=<one of them>, or a chain such as '{backend.name},{capable[0] if capable else 'reference'}'.",
            )
        accepted = ", ".join(backend.info.device_types or ()) if backend.info else "?"
        return DeviceError(
            op.name,
            device_arg,
            f"a tensor on {accepted} for backend '{backend.name}' (selected by {source})",
            f"a tensor on {device_type}",
            f"Move the inputs to {accepted}, or select a backend that takes {device_type} tensors: {alternatives}.",
        )
    reasons = "; ".join(skipped)
    message = (
        f"{op.name}: no backend in {source} can run it on {device_type} tensors ({reasons}). "
        f"Backends that can: {alternatives}."
    )
    if all("unavailable" in s for s in skipped):
        return BackendUnavailableError(message)
    lacking = [b for b in candidates if b.available and b.implements(op.hook) and _missing(b, op, features)]
    if lacking and all("unavailable" in s or "lacks feature" in s for s in skipped):
        missing = tuple(sorted(set().union(*(_missing(b, op, features) for b in lacking))))
        return FeatureNotSupportedError(op.name, lacking[0].name, missing, tuple(capable), message)
    return OperatorNotSupportedError(message)


def clear_cache() -> None:
    """Forget cached selections (environment variables are re-read on every call anyway)."""
    _select_cached.cache_clear()
    _RECENT.clear()
