"""``hal new-backend``: write a complete vendor plugin package to start from.

The generated package registers under the ``hal.backends`` entry points, implements
``hal_backend_info`` / ``hal_backend_availability`` and declares one hook per operator, each
marked ``@not_implemented_yet``: installed untouched, the backend claims no operator and takes
nothing from any other backend, and ``hal conformance --backend NAME`` lists every operator as
not implemented yet. Writing a hook's body and deleting its marker makes exactly that operator
selectable. Hook signatures and docstrings are taken from :mod:`hal.hookspecs`, so the template
always matches the installed unihal.
"""

from __future__ import annotations

import inspect
import keyword
import re
import textwrap
from pathlib import Path

from hal import hookspecs
from hal.operator import OPERATORS

__all__ = ["write_backend_package", "valid_backend_name"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def valid_backend_name(name: str) -> bool:
    """Lower-case identifier: it becomes the entry-point name and part of the module name."""
    return bool(_NAME.match(name)) and not keyword.iskeyword(name)


def _operator_hooks() -> str:
    hooks = {op.hook: op for op in OPERATORS.values()}
    blocks = []
    for hook_name in (n for n in vars(hookspecs) if n.startswith("hal_") and n in hooks):
        spec = getattr(hookspecs, hook_name)
        params = ", ".join(inspect.signature(spec).parameters)
        summary = inspect.getdoc(spec).splitlines()[0].rstrip(".")
        op = hooks[hook_name]
        blocks.append(
            f'''@hookimpl
@not_implemented_yet  # delete this line once the body below computes {op.name}
def {hook_name}({params}):
    """{summary}: operator ``{op.name}``, contract in hal.hookspecs.{hook_name}."""
    raise OperatorNotSupportedError(f"{{BACKEND}}: {op.name} is not implemented yet (see hal.hookspecs.{hook_name})")
'''
        )
    return "\n\n".join(blocks)


def _files(name: str) -> dict[str, str]:
    package = f"hal_{name}"
    plugin = f'''"""The {name} backend for unihal: fill in the operator hooks below.

Arguments arrive validated (shapes, dtypes, layouts, devices per hal.ops); results must follow the
references in hal.ops within the tolerances of `hal conformance`. Every operator hook starts
marked @not_implemented_yet: the backend claims none of them, so installing this package as it is
takes nothing away from other backends. To add an operator, write its body and delete its marker;
`hal conformance --backend {name}` then certifies it. Delete hooks you will never implement.
"""

from __future__ import annotations

from hal.errors import OperatorNotSupportedError
from hal.plugin import Availability, BackendInfo, hookimpl, not_implemented_yet

BACKEND = "{name}"


@hookimpl
def hal_backend_info() -> BackendInfo:
    # device_types: the torch device types whose tensors this backend consumes (None = any).
    return BackendInfo(description="{name} backend for unihal", priority=10, device_types=("cpu",))


@hookimpl
def hal_backend_availability() -> Availability:
    # Probe the device or driver here; say exactly what is missing when it is not there.
    return Availability(True, device="describe the device found")


{_operator_hooks()}'''
    return {
        "pyproject.toml": f'''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "hal-{name.replace("_", "-")}"
version = "0.1.0"
description = "The {name} backend for unihal"
requires-python = ">=3.10"
# unihal itself is not on PyPI: install it first (pip install -e path/to/unihal), then this package.
dependencies = []

[project.entry-points."hal.backends"]
{name} = "{package}.plugin"

[tool.setuptools]
packages = ["{package}"]
''',
        f"{package}/__init__.py": f'"""The {name} backend for unihal (see plugin.py)."""\n',
        f"{package}/plugin.py": plugin,
        "ci/conformance.sh": f'''#!/usr/bin/env bash
# Certify the {name} backend: install, check discovery, run the conformance suite, keep the report.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e .
hal backends
hal conformance --backend {name} --report conformance-report
pytest --pyargs hal.conformance --hal-backend={name}
''',
        "README.md": f'''# hal-{name}

The `{name}` backend for unihal. Installing this package registers it under the `hal.backends`
entry points; `hal backends` then lists it. Install unihal first (it is not on PyPI).

    pip install -e .
    HAL_BACKEND={name} python your_app.py          # every operator on {name}
    HAL_BACKEND_MLA_DECODE={name} python your_app.py   # one operator
    ci/conformance.sh                                # certify against the Hopper reference

Implement the hooks in `{package}/plugin.py` (their contracts: `hal/hookspecs.py` in unihal).
''',
    }


def write_backend_package(name: str, directory: Path) -> list[Path]:
    """Write the package for backend ``name`` into ``directory`` (created; must be empty or absent)."""
    if not valid_backend_name(name):
        raise ValueError(f"backend name {name!r}: use a lower-case identifier such as 'myvendor'")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory")
    written = []
    for relative, text in _files(name).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text) if relative.endswith(".toml") else text)
        if relative.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written
