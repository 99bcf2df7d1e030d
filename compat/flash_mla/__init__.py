"""FlashMLA's public API on hal (``import hal.compat.flash_mla as flash_mla``), as FlashMLA has it now.

- ``get_mla_metadata(*args, **kwargs)`` -> ``(FlashMLASchedMeta(), None)``: any arguments are
  accepted and ignored, as FlashMLA's are (the schedule is computed on the first
  ``flash_mla_with_kvcache`` call that uses it). Code written for FlashMLA 1.0 that unpacks
  ``tile_scheduler_metadata, num_splits`` and passes both on keeps working: the call takes the
  schedule and ``num_splits=None``. hal's own :func:`hal.get_mla_metadata` still returns the v1
  tensors when given the three v1 arguments.
- ``flash_mla_with_kvcache`` takes the DeepSeek-V3.2 arguments too (``is_fp8_kvcache``,
  ``indices``, ``attn_sink``, ``extra_k_cache``, ``extra_indices_in_kvcache``, ``topk_length``,
  ``extra_topk_length``) and v1 tensors from :func:`hal.get_mla_metadata`;
  ``flash_mla_sparse_fwd`` is the sparse prefill (d_qk 576 or 512).
- ``flash_mla.flash_mla_interface`` holds the same names, as FlashMLA's module does.

Contracts: :mod:`hal.ops.mla`, :mod:`hal.ops.mla_v2`. FlashMLA's dense prefill
(``flash_attn_varlen_*``, SM100) is not provided; see the README.
"""

from hal.compat import not_provided
from hal.compat.flash_mla.flash_mla_interface import FlashMLASchedMeta, flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd", "FlashMLASchedMeta", "flash_mla_interface", "NOT_PROVIDED"]

__version__ = "1.0.0"  # FlashMLA's package version whose API this follows

# FlashMLA names hal does not provide, and why (the README's FlashMLA table says the same).
NOT_PROVIDED: dict[str, str] = {
    "flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func":
        "FlashMLA's dense MHA prefill with backward (SM100 kernels), not in unihal's contracts; use torch's scaled_dot_product_attention",
}


def __getattr__(name: str):
    raise not_provided("flash_mla", NOT_PROVIDED, name)


from hal.compat.flash_mla import flash_mla_interface  # noqa: E402
