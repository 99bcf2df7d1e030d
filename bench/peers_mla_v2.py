"""torch formulation of FlashMLA's V3.2 decode: the "torch" peer of ``mla_decode_v2``.

Inputs are the conformance family's (:class:`hal.conformance.cases_mla_v2.MlaDecodeV2Family`):
q [b, s_q, h_q, d_qk] with its index lists (sparse mode) or block table and lengths (dense mode,
turned into each token's causal window as the OpenCL backend does), a bf16 cache, the 656-byte
V3.2 FP8 cache or MODEL1's pages, optional sinks, ``topk_length`` and an extra cache.

- gathered fp32 bmm: each query token's keys gathered from the cache and, for FP8 caches,
  dequantised there (only the keys a call names, never the whole cache), widened to fp32; one
  [h_q, d] x [d, keys] bmm per token batched over all tokens, a mask for unused entries, softmax,
  P @ V, the sink factor. Unused entries gather key 0 and are zeroed before any product, so a
  NaN in a slot nobody names cannot reach the output (the conformance caches poison those slots).
"""

from __future__ import annotations

import torch

from hal.bench.formulation import Formulation, Prepared
from hal.bench.peers_mla import _softmax_pv
from hal.conformance.case import Tensors
from hal.ops.mla_fp8_cache import (
    FP8_TOKEN_BYTES, MODEL1_DATA_BYTES, MODEL1_DIM, MODEL1_SCALE_BYTES, MODEL1_TILES, decode_mla_records, decode_model1_tokens, model1_pages,
)
from hal.ops.mla_v2 import dense_window_indices

__all__ = ["MLA_V2_FORMULATIONS"]

_V = 512  # V: the first 512 dims of a 576-wide key, or the whole 512-wide MODEL1 key


def _keys(cache: torch.Tensor, positions: torch.Tensor, fp8: bool, model1: bool) -> torch.Tensor:
    """float32 [..., d] of the keys at ``positions`` (int64, block * page + slot, each valid)."""
    blocks, page = cache.shape[:2]
    if model1:
        pages = model1_pages(cache)
        block, slot = positions[..., None] // page, positions[..., None] % page
        data = pages[block, slot * MODEL1_DATA_BYTES + torch.arange(MODEL1_DATA_BYTES)]
        exponents = pages[block, page * MODEL1_DATA_BYTES + slot * MODEL1_SCALE_BYTES + torch.arange(MODEL1_TILES)]
        return decode_model1_tokens(data, exponents)
    if fp8:
        return decode_mla_records(cache.view(torch.uint8).reshape(blocks * page, FP8_TOKEN_BYTES)[positions])
    return cache.reshape(blocks * page, cache.shape[-1])[positions].float()


def _lists(inputs: Tensors) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(cache, indices int32 [b, s_q, topk], lengths [b] or None) of the main list and the extra one."""
    q = inputs["q"]
    indices = inputs["indices"]
    if indices is None:
        causal = bool(inputs["causal"]) and q.shape[1] > 1
        indices = dense_window_indices(inputs["block_table"], inputs["cache_seqlens"], q.shape[1], inputs["k_cache"].shape[1], causal)
    lists = [(inputs["k_cache"], indices, inputs["topk_length"])]
    if inputs["extra_k_cache"] is not None:
        lists.append((inputs["extra_k_cache"], inputs["extra_indices"], inputs["extra_topk_length"]))
    return lists


def _gathered_fp32(inputs: Tensors) -> Prepared:
    q, fp8, sink = inputs["q"], bool(inputs["fp8"]), inputs["attn_sink"]
    batch, s_q, h_q, d_qk = q.shape
    model1 = fp8 and d_qk == MODEL1_DIM
    scale = d_qk**-0.5
    lists = _lists(inputs)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        keys, unused = [], []
        for cache, indices, lengths in lists:
            topk = indices.shape[-1]
            positions = indices.reshape(batch * s_q, topk).long()
            cut = positions < 0
            if lengths is not None:  # a token's list cut at its sequence's length
                cut |= torch.arange(topk)[None, :] >= lengths.repeat_interleave(s_q)[:, None]
            gathered = _keys(cache, positions.masked_fill(cut, 0), fp8, model1)
            keys.append(gathered.masked_fill_(cut[..., None], 0.0))  # a poisoned slot never meets a product
            unused.append(cut)
        k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)  # [tokens, keys, d]
        hidden = unused[0] if len(unused) == 1 else torch.cat(unused, dim=1)
        scores = torch.bmm(q.reshape(batch * s_q, h_q, d_qk).float(), k.transpose(1, 2)).mul_(scale)
        out, lse = _softmax_pv(scores, k[..., :_V], hidden[:, None, :].expand(-1, h_q, -1))
        if sink is not None:
            factor = 1.0 / (1.0 + torch.exp(sink.float()[None, :] - lse))
            out = torch.where(torch.isposinf(lse)[..., None], 0.0, out * factor[..., None])
        out = out.view(batch, s_q, h_q, _V).to(q.dtype)
        return out, lse.view(batch, s_q, h_q).transpose(1, 2)

    return Prepared(call, lambda: dict(zip(("out", "lse"), call())))


def _gathered_scratch(inputs: Tensors) -> int:
    q = inputs["q"]
    batch, s_q, h_q, d_qk = q.shape
    keys = sum(indices.shape[-1] for _, indices, _ in _lists(inputs))
    tokens = batch * s_q
    # fp32 keys (and the gathered bytes), fp32 scores, fp32 out
    return tokens * keys * d_qk * (4 + 4) + tokens * h_q * keys * (4 + 1) + tokens * h_q * (_V * 4 * 2 + 8)


MLA_V2_FORMULATIONS = (Formulation("gathered fp32 bmm", _gathered_fp32, _gathered_scratch),)
