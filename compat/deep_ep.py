"""DeepEP's public API on hal: ``Buffer``, ``Config``, ``EventOverlap``, ``topk_idx_t``.

``hal.compat.deep_ep.Buffer`` is :class:`hal.ep.Buffer` (dispatch/combine, cached and
low-latency modes on torch.distributed). ``Config`` carries DeepEP's kernel tuning record
(SMs and chunk sizes of its NVLink/RDMA kernels) so code that builds or passes configs ports
unchanged; the torch.distributed transport has no such kernels, so a Config tunes nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass

from hal.ep import Buffer, EventOverlap, topk_idx_t

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]


@dataclass(frozen=True)
class Config:
    """DeepEP's ``Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)`` chunking record."""

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256
