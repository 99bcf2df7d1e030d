"""A backend that supplies its own EP transport: the default one, recording every call, and
declining groups whose Buffer asks for ``low_latency_mode`` (so automatic selection moves on)."""

from hal.ep.transport import TorchTransport
from hal.plugin import Availability, BackendInfo, hookimpl

CALLS: list[str] = []


class RecordingTransport(TorchTransport):
    name = "recording"

    def dispatch(self, x, **kwargs):
        CALLS.append("dispatch")
        return super().dispatch(x, **kwargs)

    def combine(self, x, handle, **kwargs):
        CALLS.append("combine")
        return super().combine(x, handle, **kwargs)


@hookimpl
def hal_backend_info():
    return BackendInfo(description="EP transport supplier (test)", priority=50, device_types=("cpu",))


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_ep_transport(group, device, options):
    if options["low_latency_mode"]:
        return None
    return RecordingTransport(group, options["timeout_s"])
