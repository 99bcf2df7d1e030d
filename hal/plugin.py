"""What a backend plugin imports: the ``hookimpl`` marker and the two records it returns.

A backend is a Python module registered under the entry-point group ``hal.backends``::

    [project.entry-points."hal.backends"]
    myvendor = "myvendor_hal.plugin"

The module defines ``@hookimpl`` functions named after the hooks in :mod:`hal.hookspecs`:
``hal_backend_info`` and ``hal_backend_availability`` always, then one function per operator it
implements. Operators it does not define are reported as unsupported; there is no silent fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pluggy

__all__ = ["PROJECT", "hookimpl", "not_implemented_yet", "BackendInfo", "Availability", "current_contracts"]

PROJECT = "hal"
ENTRY_POINT_GROUP = "hal.backends"

hookimpl = pluggy.HookimplMarker(PROJECT)

NOT_IMPLEMENTED_MARK = "__hal_not_implemented_yet__"


def not_implemented_yet(function):
    """Mark an operator hook as declared but not written yet (what ``hal new-backend`` generates).

    The backend then claims no such operator: selection never picks it for that operator and
    conformance reports it as "not implemented yet". Remove the marker once the hook computes::

        @hookimpl
        @not_implemented_yet
        def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out): ...
    """
    setattr(function, NOT_IMPLEMENTED_MARK, True)
    return function


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about a backend, known without touching any device.

    Attributes:
        description: one line shown by ``hal backends``.
        priority: automatic selection prefers higher values (reference: 0; device backends: 100).
        device_types: torch device types whose tensors the backend consumes (``("cuda",)``,
            ``("cpu",)``); ``None`` means any device.
        features: per operator name, exactly the optional contract features the backend
            implements (``{"mla_decode_v2": ("sparse", "fp8_kv", "sink")}``); see
            :class:`hal.operator.Feature`. Takes precedence over ``contract_versions``.
        contract_versions: per operator name, the contract version the backend implements in
            full (every feature introduced up to it). An operator named in neither mapping is
            served at version 1. ``hal backends --features`` lists the result.
    """

    description: str
    priority: int = 0
    device_types: tuple[str, ...] | None = None
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    contract_versions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    """Whether the backend can run on this machine, and why not.

    Attributes:
        available: True when every operator the backend implements can run here.
        reason: when unavailable, what is missing and how to get it ("no CUDA device",
            "pyopencl not installed: pip install 'unihal[opencl]'").
        device: the device the backend found, in words ("NVIDIA H100 80GB HBM3", "PoCL cpu").
        simulated: True when kernels run in a simulator or interpreter rather than on the
            hardware they target; results are then never reported as a hardware pass.
    """

    available: bool
    reason: str = ""
    device: str = ""
    simulated: bool = False


def current_contracts() -> dict[str, int]:
    """Every operator at its current contract version: what a backend written against this unihal
    and implementing every feature declares (``BackendInfo(contract_versions=current_contracts())``).

    It follows unihal: a later contract version's features come with it, including ones that
    change what a hook receives (``ep_combine_reduce`` v2 may hand ``rows`` as a tuple of
    segments). A backend whose hooks were written against an older contract pins those
    operators: ``current_contracts() | {"ep_combine_reduce": 1}``."""
    import hal.ops  # noqa: F401  (declares the operators)
    from hal.operator import OPERATORS

    return {op.name: op.version for op in OPERATORS.values()}
