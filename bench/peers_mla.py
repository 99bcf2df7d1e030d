"""torch formulations of MLA decode over a paged KV cache: the "torch" peer of ``mla_decode``.

Every formulation computes FlashMLA's out and lse from the same inputs (q [b, s_q, h_q, 576],
k_cache [blocks, 64, 1, 576], block_table [b, max_pages] int32, cache_seqlens [b] int32), with
V = the first 512 dims of each key. Rows are the (query token, head) pairs of one sequence, s_q·h_q
of them, all sharing the sequence's single KV head (MLA's absorbed form), so each sequence is
one [rows, 576] x [576, keys] product, not a per-head attention.

- per-sequence fp32 matmul: gather the sequence's pages, widen to fp32, scores, softmax, P @ V
  (each a bmm with a batch of one).
- padded fp32 bmm: every sequence padded to the longest, one bmm each way, a length/causal mask.
- per-sequence / padded SDPA flash kernel: torch's fused CPU attention (bf16 or fp16 products,
  fp32 accumulation and softmax; CPU only) with V = K, so q, K and V share a head dim (576) and SDPA takes
  its flash kernel; out is sliced to 512 afterwards (12% more P @ V work than needed, still far
  cheaper than V = K[..., :512], which sends SDPA to its math path).

bf16 *matmuls* are not offered: torch's CPU bf16 matmul rounds the scores to bf16, which puts
the output several times outside FlashMLA's per-element bound (measured: 3x on out, 25-70x on lse).
"""

from __future__ import annotations

import math

import torch

from hal.bench.formulation import Formulation, Prepared
from hal.conformance.case import Tensors
from hal.ops.mla import HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE

__all__ = ["MLA_FORMULATIONS"]

SCALE = HEAD_DIM_QK**-0.5


def _visible(seqlen: int, s_q: int, causal: bool) -> torch.Tensor:
    """int64 [s_q]: keys query token t sees (FlashMLA's causal mask is aligned to the sequence's end)."""
    if causal and s_q > 1:
        return (seqlen - s_q + 1 + torch.arange(s_q)).clamp(min=0, max=seqlen)
    return torch.full((s_q,), seqlen, dtype=torch.int64)


def _hidden(visible: torch.Tensor, keys: int, heads: int, device: torch.device) -> torch.Tensor:
    """bool [s_q * heads, keys]: True where row (t, h) must not see the key (rows in (t, h) order)."""
    return torch.arange(keys, device=device)[None, :] >= visible.to(device).repeat_interleave(heads)[:, None]


def _softmax_pv(scores: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scores [..., rows, keys] (scaled), values [..., keys, 512] -> out [..., rows, 512], lse [..., rows].
    Rows that see no key get out 0 and lse +inf, as FlashMLA; computed in place to keep one [rows, keys] buffer."""
    if hidden is not None:
        scores.masked_fill_(hidden, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    scores.sub_(row_max.masked_fill(empty, 0.0)).exp_()
    row_sum = scores.sum(dim=-1, keepdim=True)
    out = torch.matmul(scores, values).div_(row_sum).masked_fill_(empty, 0.0)
    lse = (row_max + row_sum.log()).masked_fill_(empty, math.inf).squeeze(-1)
    return out, lse


def _sequences(inputs: Tensors) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """(index, seqlen, page ids int64, hidden-mask or None) of every non-empty sequence."""
    q, table, causal = inputs["q"], inputs["block_table"], inputs["causal"]
    s_q, h_q = q.shape[1], q.shape[2]
    plan = []
    for b, seqlen in enumerate(int(s) for s in inputs["cache_seqlens"].tolist()):
        if seqlen == 0:
            continue
        pages = table[b, : -(-seqlen // PAGE_BLOCK_SIZE)].long()
        hidden = _hidden(_visible(seqlen, s_q, causal), seqlen, h_q, q.device) if causal and s_q > 1 else None
        plan.append((b, seqlen, pages, hidden))
    return plan


def _empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, s_q, h_q, _ = q.shape
    return torch.zeros(batch, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=q.device), torch.full((batch, h_q, s_q), math.inf, device=q.device)


def _per_sequence_fp32(inputs: Tensors) -> Prepared:
    q, k_cache = inputs["q"], inputs["k_cache"]
    _, s_q, h_q, _ = q.shape
    plan = _sequences(inputs)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _empty_outputs(q)
        for b, seqlen, pages, hidden in plan:
            # bmm with a batch of one: ~25% faster than 2-D matmul on a transposed operand here
            keys = k_cache[pages].view(1, -1, HEAD_DIM_QK)[:, :seqlen].float()  # [1, n, 576]
            scores = torch.bmm(q[b].reshape(1, s_q * h_q, HEAD_DIM_QK).float(), keys.transpose(1, 2)).mul_(SCALE)
            o, l = _softmax_pv(scores, keys[..., :HEAD_DIM_V], None if hidden is None else hidden[None])
            out[b] = o.view(s_q, h_q, HEAD_DIM_V)
            lse[b] = l.view(s_q, h_q).T
        return out, lse

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


def _per_sequence_fp32_scratch(inputs: Tensors) -> int:
    rows = inputs["q"].shape[1] * inputs["q"].shape[2]
    longest = int(inputs["cache_seqlens"].max()) if inputs["cache_seqlens"].numel() else 0
    padded = -(-longest // PAGE_BLOCK_SIZE) * PAGE_BLOCK_SIZE
    return padded * HEAD_DIM_QK * (2 + 4) + rows * longest * (4 + 1) + 2 * _outputs_bytes(inputs)


def _outputs_bytes(inputs: Tensors) -> int:
    batch, s_q, h_q, _ = inputs["q"].shape
    return batch * s_q * h_q * (HEAD_DIM_V * 4 + 4)


def _padded_plan(inputs: Tensors) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Page ids [b, pages] int64 (unused entries -> block 0, masked), hidden mask [b, rows, S], S."""
    q, table, seqlens = inputs["q"], inputs["block_table"], inputs["cache_seqlens"].tolist()
    s_q, h_q = q.shape[1], q.shape[2]
    pages = -(-max(seqlens, default=0) // PAGE_BLOCK_SIZE)
    width = pages * PAGE_BLOCK_SIZE
    hidden = torch.stack([_hidden(_visible(n, s_q, inputs["causal"]), width, h_q, q.device) for n in seqlens]) if seqlens else torch.zeros(0, 0, 0, dtype=torch.bool)
    return table[:, :pages].clamp(min=0).long(), hidden, width


def _padded_fp32(inputs: Tensors) -> Prepared:
    q, k_cache = inputs["q"], inputs["k_cache"]
    batch, s_q, h_q, _ = q.shape
    page_ids, hidden, width = _padded_plan(inputs)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        if batch == 0 or width == 0:
            return _empty_outputs(q)
        keys = k_cache[page_ids].view(batch, width, HEAD_DIM_QK).float()
        scores = torch.bmm(q.reshape(batch, s_q * h_q, HEAD_DIM_QK).float(), keys.transpose(1, 2)).mul_(SCALE)
        o, l = _softmax_pv(scores, keys[..., :HEAD_DIM_V], hidden)
        return o.view(batch, s_q, h_q, HEAD_DIM_V).to(q.dtype), l.view(batch, s_q, h_q).transpose(1, 2)

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


def _padded_scratch(inputs: Tensors, key_bytes: int, score_bytes: int) -> int:
    batch, s_q, h_q, _ = inputs["q"].shape
    width = -(-int(inputs["cache_seqlens"].max()) // PAGE_BLOCK_SIZE) * PAGE_BLOCK_SIZE if batch else 0
    return batch * width * HEAD_DIM_QK * key_bytes + batch * s_q * h_q * width * score_bytes + 2 * _outputs_bytes(inputs)


def _flash(query: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's fused CPU kernel with V = K: query [B, 1, rows, 576], keys [B, 1, n, 576], hidden
    [B, 1, rows, n] bool or None -> out [B, rows, 512], lse [B, rows]. The fused op is called by
    its aten name because the public one does not return lse; it takes an additive mask."""
    mask = None if hidden is None else torch.zeros(hidden.shape, dtype=query.dtype, device=query.device).masked_fill_(hidden, -math.inf)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, keys, 0.0, False, attn_mask=mask, scale=SCALE)
    out, lse = out[:, 0, :, :HEAD_DIM_V], lse[:, 0].float()
    if hidden is not None:  # rows that see no key: FlashMLA's 0 and +inf, not the kernel's NaN
        empty = hidden[:, 0].all(dim=-1)
        out, lse = out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, math.inf)
    return out, lse


def _per_sequence_flash(inputs: Tensors) -> Prepared:
    q, k_cache = inputs["q"], inputs["k_cache"]
    _, s_q, h_q, _ = q.shape
    plan = _sequences(inputs)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _empty_outputs(q)
        for b, seqlen, pages, hidden in plan:
            keys = k_cache[pages].view(1, 1, -1, HEAD_DIM_QK)[:, :, :seqlen]
            o, l = _flash(q[b].reshape(1, 1, s_q * h_q, HEAD_DIM_QK), keys, None if hidden is None else hidden[None, None])
            out[b] = o.view(s_q, h_q, HEAD_DIM_V)
            lse[b] = l.view(s_q, h_q).T
        return out, lse

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


def _per_sequence_flash_scratch(inputs: Tensors) -> int:
    rows = inputs["q"].shape[1] * inputs["q"].shape[2]
    longest = int(inputs["cache_seqlens"].max()) if inputs["cache_seqlens"].numel() else 0
    return longest * HEAD_DIM_QK * 2 + rows * longest * (2 + 1) + 2 * _outputs_bytes(inputs)


def _padded_flash(inputs: Tensors) -> Prepared:
    q, k_cache = inputs["q"], inputs["k_cache"]
    batch, s_q, h_q, _ = q.shape
    page_ids, hidden, width = _padded_plan(inputs)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        if batch == 0 or width == 0:
            return _empty_outputs(q)
        keys = k_cache[page_ids].view(batch, 1, width, HEAD_DIM_QK)
        o, l = _flash(q.reshape(batch, 1, s_q * h_q, HEAD_DIM_QK), keys, hidden[:, None])
        return o.reshape(batch, s_q, h_q, HEAD_DIM_V), l.view(batch, s_q, h_q).transpose(1, 2)

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


MLA_FORMULATIONS = (
    Formulation("per-sequence fp32 matmul", _per_sequence_fp32, _per_sequence_fp32_scratch),
    Formulation("padded fp32 bmm", _padded_fp32, lambda inputs: _padded_scratch(inputs, 2 + 4, 4 + 1)),
    # CPU only: on GPUs flash_mla is the peer, and SDPA's GPU kernels take no 576-wide heads.
    Formulation("per-sequence SDPA flash kernel (V = K)", _per_sequence_flash, _per_sequence_flash_scratch, devices=("cpu",)),
    Formulation("padded SDPA flash kernel (V = K)", _padded_flash, lambda inputs: _padded_scratch(inputs, 2, 2 + 1), devices=("cpu",)),
)
