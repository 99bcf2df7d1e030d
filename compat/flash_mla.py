"""FlashMLA's public API on hal, both generations.

- v1: ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)`` -> tensors, passed
  to ``flash_mla_with_kvcache(..., tile_scheduler_metadata, num_splits, ...)``.
- current (DeepSeek-V3.2): ``get_mla_metadata()`` -> ``(FlashMLASchedMeta, None)``, passed with
  ``num_splits=None``; ``flash_mla_with_kvcache`` also takes ``is_fp8_kvcache``, ``indices``,
  ``attn_sink``, ``extra_k_cache``, ``extra_indices_in_kvcache``, ``topk_length``,
  ``extra_topk_length``; ``flash_mla_sparse_fwd`` is the sparse prefill.

Same signatures and results as ``flash_mla`` (contracts: :mod:`hal.ops.mla`, :mod:`hal.ops.mla_v2`).
"""

from hal.ops.mla import flash_mla_with_kvcache, get_mla_metadata
from hal.ops.mla_v2 import MLASchedule as FlashMLASchedMeta
from hal.ops.mla_v2 import flash_mla_sparse_fwd

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd", "FlashMLASchedMeta"]
