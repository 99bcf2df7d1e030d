"""pytest plugin (entry point ``pytest11``): run the conformance catalogue as tests in any CI.

    pytest --pyargs hal.conformance --hal-backend=myvendor [--hal-full]

Options:
    --hal-backend NAME   backend to certify (repeatable); default: every available backend.
    --hal-full           every case instead of the quick subset.

Any test that requests the ``hal_conformance_case`` fixture is parametrised over the selected
cases, and over the selected backends when it also requests ``hal_backend_name``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hal", "unihal conformance")
    group.addoption("--hal-backend", action="append", default=[], metavar="NAME", help="backend to certify (repeatable; default: every available backend)")
    group.addoption("--hal-full", action="store_true", default=False, help="run every conformance case, not only the quick subset")


def _backend_names(config: pytest.Config) -> list[str]:
    from hal import registry

    known = registry.backends()
    requested = config.getoption("--hal-backend")
    if not requested:
        return [name for name, b in sorted(known.items()) if b.available]
    for name in requested:
        if name not in known:
            raise pytest.UsageError(f"--hal-backend: unknown backend {name!r}; known: {', '.join(sorted(known))}")
        if not known[name].available:
            raise pytest.UsageError(f"--hal-backend: backend {name!r} is unavailable: {known[name].availability().reason}")
    return requested


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hal_conformance_case" in metafunc.fixturenames:
        from hal.conformance.catalogue import select_cases

        cases = select_cases(quick=not metafunc.config.getoption("--hal-full"))
        metafunc.parametrize("hal_conformance_case", cases, ids=[c.id for c in cases])
    if "hal_backend_name" in metafunc.fixturenames:
        names = _backend_names(metafunc.config)
        metafunc.parametrize("hal_backend_name", names, ids=names)
