"""``deep_gemm.utils.math``: integer helpers, the FP8 casts and UE8M0 scales (:mod:`hal.ops.ue8m0`), the FP4 helpers (:mod:`hal.ops.fp4`)."""

from __future__ import annotations

from hal.compat.deep_gemm import align, ceil_div
from hal.ops.fp4 import cast_back_from_fp4, per_token_cast_to_fp4, transpose_packed_fp4
from hal.ops.ue8m0 import (
    ceil_to_ue8m0,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0_from_int,
)

__all__ = [
    "ceil_div", "align", "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int",
    "per_token_cast_to_fp8", "per_channel_cast_to_fp8", "per_block_cast_to_fp8", "per_custom_dims_cast_to_fp8",
    "per_token_cast_to_fp4", "transpose_packed_fp4", "cast_back_from_fp4",
]
