"""``flash_mla.flash_mla_interface``: FlashMLA's interface module (see :mod:`hal.compat.flash_mla`)."""

from __future__ import annotations

from typing import Any

from hal.ops.mla import flash_mla_with_kvcache
from hal.ops.mla_v2 import MLASchedule as FlashMLASchedMeta
from hal.ops.mla_v2 import flash_mla_sparse_fwd

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd"]


def get_mla_metadata(*args: Any, **kwargs: Any) -> tuple[FlashMLASchedMeta, None]:
    """An empty schedule, filled by the first :func:`flash_mla_with_kvcache` call that uses it.

    As FlashMLA's: every argument is accepted and ignored (the v1 form
    ``(cache_seqlens, s_q * h_q // h_kv, h_kv)``, the later ``(..., h_q, is_fp8, topk)`` form,
    keywords such as ``num_heads_q``, ``is_fp8_kvcache``, ``topk``). Returns ``(schedule, None)``;
    pass both on as ``tile_scheduler_metadata`` and ``num_splits``."""
    return FlashMLASchedMeta(), None
