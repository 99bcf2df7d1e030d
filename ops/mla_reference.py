"""Executable reference of MLA decode, with FlashMLA's numerics.

Follows FlashMLA's own test: per sequence, gather the keys through the block table, scores in
fp32, masked softmax, ``P @ V`` in fp32, output cast to q's dtype; lse is the natural-log
log-sum-exp of the scaled scores. Runs on any torch device.
"""

from __future__ import annotations

import math

import torch

from hal.ops.mla_schedule import BLOCK_SIZE_N

__all__ = ["mla_decode_reference", "gather_sequence_keys", "causal_visible_keys"]


def gather_sequence_keys(k_cache: torch.Tensor, block_table_row: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Keys of one sequence in token order: [seqlen, h_kv, d], token t at page t // 64, slot t % 64."""
    num_pages = -(-seqlen // BLOCK_SIZE_N)
    pages = k_cache[block_table_row[:num_pages].long()]  # [pages, 64, h_kv, d]
    return pages.reshape(num_pages * BLOCK_SIZE_N, *k_cache.shape[2:])[:seqlen]


def causal_visible_keys(seqlen: int, s_q: int, causal: bool, device: torch.device) -> torch.Tensor:
    """int64 [s_q]: how many keys query i may attend to (``seqlen - s_q + i + 1`` when causal)."""
    counts = torch.full((s_q,), seqlen, dtype=torch.int64, device=device)
    if causal:
        counts = (seqlen - s_q + 1 + torch.arange(s_q, device=device)).clamp(min=0, max=seqlen)
    return counts


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`hal.ops.mla.flash_mla_with_kvcache` (arguments already validated).

    The schedule (metadata, num_splits) does not change the result and is not used here.
    Per (query token, head) row, with ``s`` the scaled scores of the keys it sees:

    - a row that sees no key (an empty sequence, or a causal query before the sequence's first
      key) gets out = 0 and lse = +inf, as FlashMLA;
    - otherwise ``m = max(s)`` (NaN if any score is NaN), ``p = exp(s - m)`` (0 for keys it does
      not see; ``m`` taken as 0 while it is -inf), ``l = sum(p)``, ``out = (p @ V) / l`` over every
      key of the sequence and ``lse = m + log(l)``. So NaN or inf in q or in a key reaches the
      outputs as this float math takes it there: a NaN score gives NaN out and lse; a +inf score
      gives NaN (inf - inf); scores that are all -inf give out NaN (0 / 0) and lse -inf; a
      non-finite value in a key the row does not see still meets it as ``0 * v`` in ``p @ V``
      when that key lies inside the sequence, as in FlashMLA's kernel and test. Keys past the
      sequence's end are never read. An input NaN never produces the empty-row marker.
    """
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(batch, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    if q.numel() == 0:  # s_q == 0 or h_q == 0: empty results of the contract's shapes
        return out, lse
    for b, seqlen in enumerate(int(s) for s in cache_seqlens.tolist()):
        if seqlen == 0:
            continue
        keys = gather_sequence_keys(k_cache, block_table[b], seqlen).float()  # [n, h_kv, d]
        # Queries of kv head j are q heads j*group .. (j+1)*group-1: [h_kv, s_q * group, d].
        queries = q[b].float().reshape(s_q, h_kv, group, -1).permute(1, 0, 2, 3).reshape(h_kv, s_q * group, -1)
        scores = torch.einsum("hmd,nhd->hmn", queries, keys) * softmax_scale
        visible = causal_visible_keys(seqlen, s_q, causal, q.device).repeat_interleave(group)  # [s_q * group]
        mask = torch.arange(seqlen, device=q.device)[None, :] >= visible[:, None]
        scores = scores.masked_fill(mask[None], -math.inf)
        row_max = scores.amax(dim=-1)  # NaN-propagating
        safe_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
        probs = torch.exp(scores - safe_max[..., None])  # masked keys: exp(-inf) = 0
        row_sum = probs.sum(dim=-1)
        values = torch.einsum("hmn,nhd->hmd", probs, keys[..., :head_dim_v]) / row_sum[..., None]
        row_lse = row_max + torch.log(row_sum)
        empty = (visible == 0)[None, :]  # [1, s_q * group]: rows that see no key
        values = values.masked_fill(empty[..., None], 0.0)
        row_lse = row_lse.masked_fill(empty, math.inf)
        out[b] = values.reshape(h_kv, s_q, group, head_dim_v).permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v).to(q.dtype)
        lse[b] = row_lse.reshape(h_kv, s_q, group).permute(0, 2, 1).reshape(h_q, s_q)
    return out, lse
