"""FlashMLA's public API on hal: ``get_mla_metadata`` and ``flash_mla_with_kvcache``.

Same signatures and results as ``flash_mla`` (see :mod:`hal.ops.mla` for the contract).
"""

from hal.ops.mla import flash_mla_with_kvcache, get_mla_metadata

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]
