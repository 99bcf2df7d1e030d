"""The declaration of a dispatchable operator.

Each operator is declared once, in its family module under ``hal.ops``, with :func:`declare`.
The declaration ties together the public name (used in per-operator environment variables and
by the CLI), the hook a backend implements (see :mod:`hal.hookspecs`) and the family it belongs
to. The catalogue :data:`OPERATORS` is what ``hal backends`` and selection iterate over.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Operator", "OPERATORS", "declare", "get_operator"]


@dataclass(frozen=True)
class Operator:
    """One dispatchable operator.

    Attributes:
        name: short snake_case name; ``HAL_BACKEND_<NAME>`` overrides its backend.
        hook: the hook name in :mod:`hal.hookspecs` that backends implement.
        family: ``"mla"``, ``"gemm"``, ``"ep"``...: groups operators in reports.
        summary: one line for listings.
    """

    name: str
    hook: str
    family: str
    summary: str

    @property
    def env_var(self) -> str:
        """The per-operator override variable, e.g. ``HAL_BACKEND_MLA_DECODE``."""
        return "HAL_BACKEND_" + self.name.upper()


OPERATORS: dict[str, Operator] = {}


def declare(name: str, hook: str, family: str, summary: str) -> Operator:
    """Register an operator in the catalogue; names and hooks are unique."""
    if name in OPERATORS:
        raise ValueError(f"operator {name!r} is declared twice")
    op = Operator(name=name, hook=hook, family=family, summary=summary)
    OPERATORS[name] = op
    return op


def get_operator(name: str) -> Operator:
    """Look an operator up by name; raises LookupError listing the known names."""
    try:
        return OPERATORS[name]
    except KeyError:
        known = ", ".join(sorted(OPERATORS)) or "(none)"
        raise LookupError(f"unknown operator {name!r}; known operators: {known}") from None
