"""DeepEP's public API on hal: ``Buffer``, ``Config``, ``EventOverlap``, ``topk_idx_t``.

``hal.compat.deep_ep.Buffer`` is :class:`hal.ep.Buffer`: DeepEP's legacy ``Buffer`` (every
constructor argument, the config and lifetime methods, dispatch/combine with ``config``, ``bias``,
``allocate_on_comm_stream``, the low-latency mode with ``round_scale``, ``use_ue8m0``,
``use_logfmt``, ``zero_copy``, ``out``) on torch.distributed. ``Config``
(:mod:`hal.ep.config`) is DeepEP's kernel chunking record with its size hints, validated by
DeepEP's rules; the torch.distributed transport has no such kernels, so it tunes nothing there.
"""

from __future__ import annotations

from hal.ep import Buffer, EventOverlap, topk_idx_t
from hal.ep.config import Config

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]

# The DeepEP release whose legacy Buffer API this module follows (code that gates on the version reads it).
__version__ = "2.1.0"
