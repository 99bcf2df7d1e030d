"""The split-KV schedule of FlashMLA's ``get_mla_metadata``, reproduced on the host.

FlashMLA cuts the batch's KV blocks into ``num_sm_parts`` near-equal chunks, one per group of
SMs, charging each sequence a fixed overhead for its split-combine work. A chunk boundary that
falls inside a sequence splits it; ``num_splits`` is the prefix sum of splits per sequence, and
each ``tile_scheduler_metadata`` row says where an SM part begins and ends. The values are a
scheduling choice: backends may compute their own, but every ``hal_mla_decode`` must accept the
schedule returned here and produce the same output with it.

Row layout of ``tile_scheduler_metadata`` (int32 [num_sm_parts, 8]):
``[begin_batch, begin_token, end_batch, end_token, begin_split, 0, 0, 0]``, tokens counted in
the sequence, the end inclusive of ``end_batch``.
"""

from __future__ import annotations

import torch

from hal import optional
from hal.checks import expect_int, expect_tensor

__all__ = ["BLOCK_SIZE_M", "BLOCK_SIZE_N", "FIXED_OVERHEAD_BLOCKS", "METADATA_WIDTH", "HOPPER_NUM_SMS", "schedule_mla_splits", "unsplit_schedule", "one_part_scheduler", "default_num_sms"]

BLOCK_SIZE_M = 64  # query rows (s_q * h_q / h_kv) per tile
BLOCK_SIZE_N = 64  # keys per KV block, also the page size
FIXED_OVERHEAD_BLOCKS = 5  # cost charged per split, in KV blocks
METADATA_WIDTH = 8
HOPPER_NUM_SMS = 132  # H100/H800 SXM5; used when no CUDA device tells its own count


def default_num_sms(device: torch.device) -> int:
    """SM count of ``device`` when it is a CUDA device, else the Hopper SXM5 count."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_NUM_SMS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def schedule_mla_splits(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [batch + 1])``.

    Args:
        cache_seqlens: int32 [batch] (validated by the caller), on any device; results are on it.
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``.
        num_heads_k: ``h_kv``.
        num_sms: SMs to schedule for; default :func:`default_num_sms` of the seqlens' device.
    """
    op = "schedule_mla_splits"  # a public helper too (another GPU's schedule): its own checks, once per step
    expect_tensor(op, "cache_seqlens", cache_seqlens, dtypes=torch.int32, shape=(None,), dims=("batch",))
    expect_int(op, "num_q_tokens_per_head_k", num_q_tokens_per_head_k, minimum=1)
    expect_int(op, "num_heads_k", num_heads_k, minimum=1)
    if num_sms is not None:
        expect_int(op, "num_sms", num_sms, minimum=1)
    device = cache_seqlens.device
    sms = default_num_sms(device) if num_sms is None else num_sms
    num_sm_parts = max(sms // num_heads_k // _cdiv(num_q_tokens_per_head_k, BLOCK_SIZE_M), 1)
    seqlens = [int(s) for s in cache_seqlens.tolist()]
    batch = len(seqlens)
    blocks = [_cdiv(s, BLOCK_SIZE_N) for s in seqlens]
    total = sum(n + FIXED_OVERHEAD_BLOCKS for n in blocks)
    payload = _cdiv(total, num_sm_parts) + FIXED_OVERHEAD_BLOCKS

    metadata = [[0] * METADATA_WIDTH for _ in range(num_sm_parts)]
    num_splits = [0] * (batch + 1)
    now_idx = now_block = now_split = cum_splits = 0
    for part in range(num_sm_parts):
        begin = (now_idx, now_block * BLOCK_SIZE_N, now_split)
        remain = payload
        while now_idx < batch:
            left = blocks[now_idx] - now_block
            if remain >= left + FIXED_OVERHEAD_BLOCKS:
                cum_splits += now_split + 1
                num_splits[now_idx + 1] = cum_splits
                remain -= left + FIXED_OVERHEAD_BLOCKS
                now_idx, now_block, now_split = now_idx + 1, 0, 0
            else:
                if remain - FIXED_OVERHEAD_BLOCKS > 0:
                    now_block += remain - FIXED_OVERHEAD_BLOCKS
                    now_split += 1
                break
        if now_block > 0:
            end = (now_idx, now_block * BLOCK_SIZE_N)
        else:
            end = (now_idx - 1, seqlens[now_idx - 1] if now_idx > 0 else 0)
        metadata[part][:5] = [begin[0], begin[1], end[0], end[1], begin[2]]
    return (
        torch.tensor(metadata, dtype=torch.int32, device=device),
        torch.tensor(num_splits, dtype=torch.int32, device=device),
    )


def unsplit_schedule(cache_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule of one part that splits no sequence: what :func:`schedule_mla_splits` gives
    for a single SM part, computed without its loop.

    For backends that run every sequence whole (the CPU ones): they read no schedule, so
    building FlashMLA's 132-part one for them is host time spent on nothing. Same arguments and
    results as :func:`schedule_mla_splits` (``num_sm_parts`` = 1, ``num_splits = [0, 1, ..., batch]``).
    """
    batch = cache_seqlens.shape[0]
    np = optional.numpy_for(cache_seqlens)
    if np is not None:  # a plain CPU tensor: NumPy builds both in a fraction of torch.tensor's dispatch
        metadata = np.zeros((1, METADATA_WIDTH), dtype=np.int32)
        metadata[0, 2] = batch - 1
        metadata[0, 3] = cache_seqlens.numpy()[-1] if batch else 0
        return torch.from_numpy(metadata), torch.from_numpy(np.arange(batch + 1, dtype=np.int32))
    last = int(cache_seqlens[-1]) if batch else 0
    metadata = torch.tensor([[0, 0, batch - 1, last, 0, 0, 0, 0]], dtype=torch.int32, device=cache_seqlens.device)
    return metadata, torch.arange(batch + 1, dtype=torch.int32, device=cache_seqlens.device)


def one_part_scheduler(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``hal_get_mla_metadata`` implementation for backends whose kernels walk every sequence
    whole and read no schedule: :func:`unsplit_schedule`, whatever the head counts. Such a backend
    registers it as is (``hal_get_mla_metadata = hookimpl(one_part_scheduler)``); ``num_sm_parts``
    tells torch.compile's fake implementation the shape it gives."""
    return unsplit_schedule(cache_seqlens)


one_part_scheduler.num_sm_parts = 1  # type: ignore[attr-defined]
