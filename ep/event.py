"""DeepEP's ``EventOverlap`` and receive hook, for a transport that finishes before returning.

DeepEP (``deep_ep/utils.py``) wraps a CUDA event recorded after its communication kernels;
``current_stream_wait()`` makes the current stream wait for it, and the ``with`` form waits on
exit. Its low-latency calls also return a receive hook: with ``return_recv_hook=True`` the
kernel only issues the sends and calling the hook receives the data; otherwise DeepEP returns
None. The torch.distributed transport completes every exchange before returning, so its event
marks the current stream at that point (already satisfied) and its hook has nothing left to do.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

__all__ = ["EventOverlap", "capture", "received"]


class EventOverlap:
    """An event to order the current stream after a communication (DeepEP's class of that name).

    Attributes:
        event: a recorded ``torch.cuda.Event``, or None on the CPU (nothing to wait for).
        extra_tensors: tensors kept alive until the event completes (DeepEP's stand-in for
            ``record_stream``).
        hook_after_wait: called once after the next :meth:`current_stream_wait` (DeepEP's hook,
            set with :meth:`register_hook_after_wait`).
    """

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Callable[[], Any] | None = None
        self._release_handle_by_call = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """Make ``torch.cuda.current_stream()`` wait for the event (no-op without one), then run the
        registered hook once; ``release_handle`` drops the event afterwards."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable[[], Any]) -> None:
        """Run ``hook_after_wait`` after the next :meth:`current_stream_wait` (one hook at a time)."""
        if self.hook_after_wait is not None:
            raise RuntimeError("EventOverlap.register_hook_after_wait: a hook is already registered on this event")
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        """``with event(release_handle=True):``: the wait at the block's end then drops the event."""
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        release, self._release_handle_by_call = self._release_handle_by_call, False
        self.current_stream_wait(release_handle=release)


def capture(device: torch.device) -> EventOverlap:
    """An event recorded now on ``device``'s current stream (no event for CPU tensors)."""
    if device.type != "cuda":
        return EventOverlap()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return EventOverlap(event)


def received() -> None:
    """The receive hook of a synchronous transport: the data arrived before the call returned."""
