"""A deliberately wrong backend: MLA decode reads every sequence one page too far in the block table."""

import torch

from hal.ops.mla_reference import mla_decode_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="off-by-one page (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    shifted = torch.cat([block_table[:, 1:], block_table[:, -1:]], dim=1).clamp(min=0)
    return mla_decode_reference(q, k_cache, shifted, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
