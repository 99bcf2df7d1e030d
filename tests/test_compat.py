"""Drop-in modules, exercised by code shaped like the anchors' own test scripts."""

from __future__ import annotations

import math
import random

import torch

import hal.compat.deep_gemm as deep_gemm
import hal.compat.flash_mla as flash_mla


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def test_flash_mla_test_script_shape():
    """As FlashMLA's tests/test_flash_mla.py: varlen seqlens, padded block table, NaN beyond each length."""
    torch.manual_seed(0)
    random.seed(0)
    b, s_q, h_q, h_kv, d, dv, block_size, mean_sk = 4, 2, 16, 1, 576, 512, 64, 300
    cache_seqlens = torch.tensor([max(int(random.normalvariate(mean_sk, mean_sk / 2)), s_q) for _ in range(b)], dtype=torch.int32)
    max_seqlen_pad = math.ceil(int(cache_seqlens.max()) / 256) * 256
    q = torch.randn(b, s_q, h_q, d).bfloat16()
    block_table = torch.arange(b * max_seqlen_pad // block_size, dtype=torch.int32).view(b, max_seqlen_pad // block_size)
    blocked_k = torch.randn(block_table.numel(), block_size, h_kv, d).bfloat16()
    for i in range(b):
        blocked_k.view(b, max_seqlen_pad, h_kv, d)[i, cache_seqlens[i].item():] = float("nan")
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tile_scheduler_metadata, num_splits, causal=True)

    dense = blocked_k.view(b, max_seqlen_pad, h_kv, d)
    for i in range(b):
        n = int(cache_seqlens[i])
        query = q[i].transpose(0, 1).float()  # [h_q, s_q, d]
        key = dense[i, :n, 0].float()
        scores = query @ key.T / math.sqrt(d)
        mask = torch.ones(s_q, n, dtype=torch.bool).tril(diagonal=n - s_q)
        scores = scores.masked_fill(~mask, float("-inf"))
        ref_lse = scores.logsumexp(-1)
        ref_out = torch.softmax(scores, -1) @ key[:, :dv]
        assert calc_diff(out[i].transpose(0, 1).float(), ref_out) < 1e-5
        assert calc_diff(lse[i], ref_lse) < 1e-5


def per_token_cast_to_fp8(x: torch.Tensor):
    m, n = x.shape
    x_view = x.view(m, -1, 128)
    x_amax = x_view.abs().float().amax(dim=2).view(m, -1).clamp(1e-4)
    return (x_view * (448.0 / x_amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(m, n), (x_amax / 448.0).view(m, -1)


def per_block_cast_to_fp8(x: torch.Tensor):
    m, n = x.shape
    x_padded = torch.zeros((math.ceil(m / 128) * 128, math.ceil(n / 128) * 128), dtype=x.dtype)
    x_padded[:m, :n] = x
    x_view = x_padded.view(-1, 128, x_padded.size(1) // 128, 128)
    x_amax = x_view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    x_scaled = (x_view * (448.0 / x_amax)).to(torch.float8_e4m3fn)
    return x_scaled.view_as(x_padded)[:m, :n].contiguous(), (x_amax / 448.0).view(x_view.size(0), x_view.size(2))


def test_deep_gemm_dense_test_shape():
    """As DeepGEMM's tests/test_core.py test_gemm: TMA-aligned column-major LHS scales, diff vs bf16 matmul."""
    torch.manual_seed(0)
    for m, k, n in ((64, 256, 384), (7, 512, 256)):
        x = torch.randn(m, k).bfloat16()
        y = torch.randn(n, k).bfloat16()
        out = torch.empty(m, n, dtype=torch.bfloat16)
        x_fp8, y_fp8 = per_token_cast_to_fp8(x), per_block_cast_to_fp8(y)
        x_fp8 = (x_fp8[0], deep_gemm.get_col_major_tma_aligned_tensor(x_fp8[1]))
        deep_gemm.gemm_fp8_fp8_bf16_nt(x_fp8, y_fp8, out)
        assert calc_diff(out, x.float() @ y.float().T) < 0.001


def test_deep_gemm_grouped_test_shapes():
    torch.manual_seed(1)
    num_groups, m, k, n = 3, 128, 256, 256
    alignment = deep_gemm.get_m_alignment_for_contiguous_layout()
    x = torch.randn(num_groups * m, k).bfloat16()
    y = torch.randn(num_groups, n, k).bfloat16()
    m_indices = torch.arange(num_groups, dtype=torch.int32).repeat_interleave(m)
    out = torch.empty(num_groups * m, n, dtype=torch.bfloat16)
    x_fp8 = per_token_cast_to_fp8(x)
    y_parts = [per_block_cast_to_fp8(y[i]) for i in range(num_groups)]
    y_fp8 = (torch.stack([p[0] for p in y_parts]), torch.stack([p[1] for p in y_parts]))
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(x_fp8, y_fp8, out, m_indices)
    ref = torch.cat([x[i * m : (i + 1) * m].float() @ y[i].float().T for i in range(num_groups)])
    assert alignment == 128 and calc_diff(out, ref) < 0.001

    masked_m = torch.tensor([128, 5, 60], dtype=torch.int32)
    xg = torch.randn(num_groups, m, k).bfloat16()
    xg_parts = [per_token_cast_to_fp8(xg[i]) for i in range(num_groups)]
    xg_fp8 = (torch.stack([p[0] for p in xg_parts]), torch.stack([deep_gemm.get_col_major_tma_aligned_tensor(p[1]) for p in xg_parts]))
    out = torch.zeros(num_groups, m, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(xg_fp8, y_fp8, out, masked_m, 64)
    for i in range(num_groups):
        rows = int(masked_m[i])
        assert calc_diff(out[i, :rows], xg[i, :rows].float() @ y[i].float().T) < 0.001


def test_deep_gemm_helpers():
    assert deep_gemm.ceil_div(129, 128) == 2
    x = torch.randn(2, 6, 3)
    aligned = deep_gemm.get_col_major_tma_aligned_tensor(x)
    assert torch.equal(aligned, x) and aligned.stride() == (3 * 8, 1, 8)
    deep_gemm.set_num_sms(100)
    assert deep_gemm.get_num_sms() == 100


def _deep_ep_round_trip(rank: int, world_size: int):
    """Shaped like DeepEP's tests/test_intranode.py: layout, dispatch, combine through the drop-in."""
    import hal.compat.deep_ep as deep_ep

    torch.manual_seed(rank)
    num_tokens, hidden, num_experts, topk = 16, 128, 8, 2
    x = torch.randn(num_tokens, hidden).bfloat16()
    topk_idx = torch.stack([torch.randperm(num_experts)[:topk] for _ in range(num_tokens)]).to(deep_ep.topk_idx_t)
    topk_weights = torch.rand(num_tokens, topk)
    buffer = deep_ep.Buffer(None, int(1e8), 0)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
    )
    combined_x, _, _ = buffer.combine(recv_x, handle)
    copies = is_token_in_rank.sum(dim=1, keepdim=True).float()
    return calc_diff(combined_x.float() / copies.clamp(min=1), x.float() * (copies > 0)), isinstance(deep_ep.Config(), deep_ep.Config)


def test_deep_ep_test_script_shape():
    from hal.ep.launch import run_local

    for outcome in run_local(_deep_ep_round_trip, 2):
        assert outcome.returned, outcome.error
        diff, has_config = outcome.value
        assert diff < 1e-5 and has_config
