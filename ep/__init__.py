"""Expert-parallel dispatch and combine across processes (DeepEP semantics) on torch.distributed.

``hal.ep.Buffer(group)`` offers DeepEP's ``deep_ep.Buffer`` methods (``get_dispatch_layout``,
``dispatch``, ``combine``, ``low_latency_dispatch``, ``low_latency_combine``) on a gloo (CPU) or
NCCL (CUDA) group. Communication is torch.distributed collectives (:mod:`hal.ep.transport`);
the work each rank does on its own tokens is hal operators (``ep_pack``, ``ep_unpack``,
``ep_combine_reduce`` in :mod:`hal.ops.ep_local`), run by the selected backend. Modules:

- :mod:`hal.ep.buffer`: the public Buffer; :mod:`hal.ep.handle`, :mod:`hal.ep.event`: what it returns.
- :mod:`hal.ep.normal`, :mod:`hal.ep.low_latency`: the two modes, with the DeepEP facts they follow.
- :mod:`hal.ep.agreement`, :mod:`hal.ep.comm`, :mod:`hal.ep.message`: the protocol (agree on a
  header, then move byte-framed tokens, every collective bounded by the timeout).
- :mod:`hal.ep.launch`: run a function on N local gloo processes; :mod:`hal.ep.bench`: the benchmark.
"""

import torch

from hal.ep.buffer import Buffer
from hal.ep.errors import EPError, EPMismatchError, EPTimeoutError
from hal.ep.event import EventOverlap
from hal.ep.handle import DispatchHandle, LowLatencyHandle
from hal.ep.transport import TorchTransport, Transport

# DeepEP's dtype for expert indices (``deep_ep.topk_idx_t``), so ``topk_idx.to(hal.ep.topk_idx_t)`` ports.
topk_idx_t = torch.int64

__all__ = [
    "Buffer",
    "EventOverlap",
    "DispatchHandle",
    "LowLatencyHandle",
    "Transport",
    "TorchTransport",
    "EPError",
    "EPMismatchError",
    "EPTimeoutError",
    "topk_idx_t",
]
