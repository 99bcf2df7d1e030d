"""Which device a backend's conformance and benchmark cases run on."""

from __future__ import annotations

from hal import registry
from hal.report import device_types_present

__all__ = ["pick_device"]


def pick_device(backend_name: str) -> str:
    """The device type a backend's cases run on: its first accepted type present here (accelerators first)."""
    backend = registry.get_backend(backend_name)
    present = device_types_present()
    accepted = backend.info.device_types if backend is not None and backend.info is not None else None
    if accepted is None:
        return next((t for t in present if t != "cpu"), "cpu")
    return next((t for t in accepted if t in present), accepted[0])
