"""FlashMLA's split-KV schedule computed on the device: one program walks the batch as FlashMLA's
own metadata kernel does, so ``get_mla_metadata`` (and the ``get_mla_metadata()`` schedule object
filled on first use) never reads sequence lengths back to the host and is CUDA-graph capturable.

Same result as :func:`hal.ops.mla_schedule.schedule_mla_splits` (the host form, which states the
algorithm), element for element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hal.ops.mla_schedule import BLOCK_SIZE_M, BLOCK_SIZE_N, FIXED_OVERHEAD_BLOCKS, METADATA_WIDTH, default_num_sms

__all__ = ["schedule_mla_splits_on_device"]


@triton.jit
def _schedule_kernel(seqlens_ptr, meta_ptr, splits_ptr, batch, num_parts, BLOCK_N: tl.constexpr, OVERHEAD: tl.constexpr, WIDTH: tl.constexpr):
    total = 0
    for i in range(batch):
        total += (tl.load(seqlens_ptr + i) + BLOCK_N - 1) // BLOCK_N + OVERHEAD
    payload = (total + num_parts - 1) // num_parts + OVERHEAD
    now_idx = 0
    now_block = 0
    now_split = 0
    cumulative = 0
    tl.store(splits_ptr, 0)
    for part in range(num_parts):
        begin_idx = now_idx
        begin_token = now_block * BLOCK_N
        begin_split = now_split
        remain = payload
        going = now_idx < batch
        while going:
            blocks = (tl.load(seqlens_ptr + now_idx) + BLOCK_N - 1) // BLOCK_N
            left = blocks - now_block
            if remain >= left + OVERHEAD:  # the rest of this sequence fits: it ends in this part
                cumulative += now_split + 1
                tl.store(splits_ptr + now_idx + 1, cumulative)
                remain -= left + OVERHEAD
                now_idx += 1
                now_block = 0
                now_split = 0
                going = now_idx < batch
            else:  # the part ends inside it: a split
                if remain - OVERHEAD > 0:
                    now_block += remain - OVERHEAD
                    now_split += 1
                going = False
        end_idx = now_idx - 1
        end_token = tl.load(seqlens_ptr + tl.maximum(now_idx - 1, 0), mask=now_idx > 0, other=0)
        if now_block > 0:
            end_idx = now_idx
            end_token = now_block * BLOCK_N
        row = meta_ptr + part * WIDTH
        tl.store(row, begin_idx)
        tl.store(row + 1, begin_token)
        tl.store(row + 2, end_idx)
        tl.store(row + 3, end_token)
        tl.store(row + 4, begin_split)
        tl.store(row + 5, 0)
        tl.store(row + 6, 0)
        tl.store(row + 7, 0)


def schedule_mla_splits_on_device(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [batch + 1])`` on the
    seqlens' device, computed there (the part count comes from shapes and the SM count only)."""
    sms = default_num_sms(cache_seqlens.device) if num_sms is None else num_sms
    parts = max(sms // num_heads_k // -(-num_q_tokens_per_head_k // BLOCK_SIZE_M), 1)
    batch = cache_seqlens.shape[0]
    meta = torch.empty(parts, METADATA_WIDTH, dtype=torch.int32, device=cache_seqlens.device)
    splits = torch.empty(batch + 1, dtype=torch.int32, device=cache_seqlens.device)
    _schedule_kernel[(1,)](
        cache_seqlens, meta, splits, batch, parts, BLOCK_N=BLOCK_SIZE_N, OVERHEAD=FIXED_OVERHEAD_BLOCKS, WIDTH=METADATA_WIDTH,
    )
    return meta, splits
