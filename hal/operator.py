"""The declaration of a dispatchable operator.

Each operator is declared once, in its family module under ``hal.ops``, with :func:`declare`.
The declaration ties together the public name (used in per-operator environment variables and
by the CLI), the hook a backend implements (see :mod:`hal.hookspecs`) and the family it belongs
to. The catalogue :data:`OPERATORS` is what ``hal backends`` and selection iterate over.

Versioned contracts. An operator's contract has a version and a set of optional *features*
(``sparse``, ``fp8_kv``, ``sink``...), each introduced at some version. A call names the features
it uses; selection only considers backends that declare them (:class:`hal.plugin.BackendInfo`
``features`` / ``contract_versions``). A backend that declares nothing for an operator serves
the features of version 1 of its contract: a plugin written before a feature existed is never
handed a call that needs it, and keeps serving the calls it can.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Feature", "Operator", "OPERATORS", "declare", "get_operator"]


@dataclass(frozen=True)
class Feature:
    """One optional part of an operator's contract.

    Attributes:
        name: short snake_case name (``fp8_kv``), unique within the operator.
        summary: what a call using it does, in words.
        since: the contract version that introduced it (1 = from the start).
    """

    name: str
    summary: str
    since: int = 1


@dataclass(frozen=True, eq=False)
class Operator:
    """One dispatchable operator.

    Attributes:
        name: short snake_case name; ``HAL_BACKEND_<NAME>`` overrides its backend.
        hook: the hook name in :mod:`hal.hookspecs` that backends implement.
        family: ``"mla"``, ``"gemm"``, ``"ep"``...: groups operators in reports.
        summary: one line for listings.
        version: the contract version (raised when a feature is added).
        features: the optional parts of the contract a backend may or may not implement.

    Operators are declared once each, so they compare and hash by identity: selection's cache
    hashes one on every call, which field-wise hashing made cost microseconds.
    """

    name: str
    hook: str
    family: str
    summary: str
    version: int = 1
    features: tuple[Feature, ...] = ()

    def feature(self, name: str) -> Feature:
        """The declared feature ``name``; raises LookupError listing the known ones."""
        for f in self.features:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.features) or "(none)"
        raise LookupError(f"operator {self.name!r} has no feature {name!r}; its features: {known}")

    def features_up_to(self, version: int) -> frozenset[str]:
        """Names of the features a backend written against contract ``version`` serves."""
        return frozenset(f.name for f in self.features if f.since <= version)

    @functools.cached_property
    def env_var(self) -> str:
        """The per-operator override variable, e.g. ``HAL_BACKEND_MLA_DECODE``."""
        return "HAL_BACKEND_" + self.name.upper()


OPERATORS: dict[str, Operator] = {}


def declare(
    name: str, hook: str, family: str, summary: str, *, version: int = 1, features: Sequence[Feature] = ()
) -> Operator:
    """Register an operator in the catalogue; names and hooks are unique, feature names unique
    within the operator and introduced no later than ``version``."""
    if name in OPERATORS:
        raise ValueError(f"operator {name!r} is declared twice")
    names = [f.name for f in features]
    if len(set(names)) != len(names) or any(not 1 <= f.since <= version for f in features):
        raise ValueError(f"operator {name!r}: feature names must be unique and each since in [1, {version}]")
    op = Operator(name=name, hook=hook, family=family, summary=summary, version=version, features=tuple(features))
    OPERATORS[name] = op
    return op


def get_operator(name: str) -> Operator:
    """Look an operator up by name; raises LookupError listing the known names."""
    try:
        return OPERATORS[name]
    except KeyError:
        known = ", ".join(sorted(OPERATORS)) or "(none)"
        raise LookupError(f"unknown operator {name!r}; known operators: {known}") from None
