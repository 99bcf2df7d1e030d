"""Every operator is a torch custom op: models calling hal compile with fullgraph=True."""

from __future__ import annotations

import pytest
import torch

import hal


def _inputs():
    g = torch.Generator().manual_seed(0)
    seqlens = torch.tensor([70, 130], dtype=torch.int32)
    q = torch.randn(2, 1, 16, 576, generator=g).bfloat16()
    k_cache = torch.randn(8, 64, 1, 576, generator=g).bfloat16()
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    w = hal.per_block_cast_to_fp8(torch.randn(256, 512, generator=g))
    experts = [hal.per_block_cast_to_fp8(torch.randn(128, 512, generator=g)) for _ in range(2)]
    wg = (torch.stack([e[0] for e in experts]), torch.stack([e[1] for e in experts]))
    topk = torch.randint(0, 8, (32, 2), generator=g)
    return q, k_cache, table, seqlens, w, wg, topk


def mla_moe_block(q, k_cache, table, seqlens, w, wg, topk):
    """Attention over the paged cache, an FP8 projection, a masked two-expert FP8 GEMM, routing counts."""
    metadata, splits = hal.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
    out, lse = hal.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, metadata, splits, causal=True)
    x = out.reshape(-1, 512)
    projected = torch.empty(x.shape[0], 256, dtype=torch.bfloat16)
    hal.gemm_fp8_fp8_bf16_nt(hal.per_token_cast_to_fp8(x), w, projected)
    tokens = hal.per_token_cast_to_fp8(x[:32].contiguous())
    a = (torch.stack([tokens[0], tokens[0]]), torch.stack([tokens[1], tokens[1]]))
    expert_out = torch.zeros(2, 32, 128, dtype=torch.bfloat16)
    hal.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, wg, expert_out, torch.tensor([32, 20], dtype=torch.int32), 32)
    per_rank, per_node, per_expert, in_rank = hal.get_dispatch_layout(topk, 8, 2)
    return projected.float().sum(-1), lse, expert_out, per_expert, in_rank, per_node is None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_mla_moe_block_compiles_fullgraph_and_matches_eager(backend):
    inputs = _inputs()
    expected = mla_moe_block(*inputs)
    torch._dynamo.reset()
    got = torch.compile(mla_moe_block, fullgraph=True, backend=backend)(*inputs)
    for g, e in zip(got, expected):
        if isinstance(e, torch.Tensor):
            assert torch.equal(g, e)
        else:
            assert g == e


def test_checks_still_run_inside_compiled_graphs():
    q, k_cache, table, seqlens, *_ = _inputs()
    metadata, splits = hal.get_mla_metadata(seqlens, 16, 1)
    bad_table = table.clone()
    bad_table[0, 0] = 99

    def decode(table):
        return hal.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, metadata, splits)

    torch._dynamo.reset()
    with pytest.raises(hal.ValueRangeError, match="block_table"):
        torch.compile(decode, fullgraph=True, backend="aot_eager")(bad_table)


@pytest.mark.parametrize(
    "op, args",
    [
        ("per_token_cast_to_fp8", lambda i: (torch.randn(4, 256).bfloat16(),)),
        ("per_block_cast_to_fp8", lambda i: (torch.randn(130, 200),)),
        ("get_dispatch_layout", lambda i: (i[6], 8, 2)),
        ("mla_decode", lambda i: (i[0], i[1], i[2], i[3], 512, *hal.get_mla_metadata(i[3], 16, 1), None, True)),
        ("gemm_fp8_nt", lambda i: (*hal.per_token_cast_to_fp8(torch.randn(3, 512)), *i[4], torch.empty(3, 256, dtype=torch.bfloat16))),
    ],
)
def test_custom_op_registrations_pass_opcheck(op, args):
    # opcheck's schema test compares inputs with arithmetic torch lacks for fp8 on the CPU.
    fp8_inputs = op == "gemm_fp8_nt"
    checks = ("test_faketensor",) if fp8_inputs else ("test_schema", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.hal, op).default, args(_inputs()), test_utils=checks)


def ep_local_block(rows, bucket_idx, weights):
    """The local steps of an expert-parallel round trip: pack per destination, slot per expert, reduce."""
    packed, src_idx, counts = hal.ep_pack(rows, bucket_idx, 4)
    slots, slot_counts = hal.ep_unpack(rows, bucket_idx[:, 0].clamp(min=0).to(torch.int32), 4, rows.shape[0])
    reduced = hal.ep_combine_reduce(packed, src_idx, rows.shape[0], weights[: packed.shape[0]])
    return reduced, counts, slots, slot_counts


def test_ep_local_operators_compile_fullgraph():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 32, generator=g).bfloat16()
    bucket_idx = torch.randint(-1, 4, (12, 2), generator=g)
    weights = torch.rand(24, generator=g)
    expected = ep_local_block(rows, bucket_idx, weights)
    torch._dynamo.reset()
    got = torch.compile(ep_local_block, fullgraph=True, backend="aot_eager")(rows, bucket_idx, weights)
    for g_, e in zip(got, expected):
        assert torch.equal(g_, e)


def v32_decode_step(index_q, index_cache, weights, lens, table, latent, q):
    """A DeepSeek-V3.2 decode step: write the FP8 cache, indexer logits, top-k, sparse MLA."""
    cache = hal.quantize_mla_kv_cache(latent)
    schedule = hal.get_paged_mqa_logits_metadata(lens, 64, 8)
    logits = hal.fp8_paged_mqa_logits(index_q, index_cache, weights, lens, table, schedule, 128, clean_logits=True)
    chosen = logits.topk(16, dim=-1).indices
    flat = (table.gather(1, (chosen // 64).long()) * 64 + chosen % 64).to(torch.int32).view(q.shape[0], 1, 16)
    meta, _ = hal.get_mla_metadata()
    out, lse = hal.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, is_fp8_kvcache=True, indices=flat,
                                          attn_sink=torch.zeros(q.shape[2]))
    prefill = hal.flash_mla_sparse_fwd(q[:, 0], latent.view(-1, 1, 576)[:8], torch.zeros(q.shape[0], 1, 4, dtype=torch.int32), 576**-0.5)
    return out, lse, prefill[0]


def test_a_v32_decode_step_compiles_fullgraph_and_matches_eager():
    g = torch.Generator().manual_seed(1)
    values, scales = hal.quantize_indexer_keys(torch.randn(4, 64, 32, generator=g))
    args = (
        torch.randn(2, 1, 8, 32, generator=g).to(torch.float8_e4m3fn), hal.pack_paged_indexer_cache(values, scales),
        torch.randn(2, 8, generator=g), torch.tensor([[100], [40]], dtype=torch.int32), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        torch.randn(4, 64, 1, 576, generator=g).bfloat16(), torch.randn(2, 1, 16, 576, generator=g).bfloat16(),
    )
    eager = v32_decode_step(*args)
    torch._dynamo.reset()
    compiled = torch.compile(v32_decode_step, backend="aot_eager", fullgraph=True)(*args)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


def current_gemm_names(a, w, d, c, xb, yb, db):
    hal.fp8_gemm_nt(a, w, d, c=c)
    hal.bf16_gemm_nn(xb, yb, db)
    return d, db


def test_deep_gemm_current_names_compile_fullgraph():
    g = torch.Generator().manual_seed(2)
    a = hal.per_token_cast_to_fp8(torch.randn(16, 256, generator=g))
    w = hal.per_block_cast_to_fp8(torch.randn(128, 256, generator=g))
    xb, yb = torch.randn(8, 128, generator=g).bfloat16(), torch.randn(128, 64, generator=g).bfloat16()
    eager = current_gemm_names(a, w, torch.empty(16, 128), torch.ones(16, 128), xb, yb, torch.empty(8, 64, dtype=torch.bfloat16))
    torch._dynamo.reset()
    compiled = torch.compile(current_gemm_names, backend="aot_eager", fullgraph=True)(
        a, w, torch.empty(16, 128), torch.ones(16, 128), xb, yb, torch.empty(8, 64, dtype=torch.bfloat16)
    )
    assert all(torch.equal(x, y) for x, y in zip(eager, compiled))


def moe_weight_and_grouped_gemms(a, grouped, m_indices, ends, x, y, c, ka, kb):
    """DeepGEMM's current grouped names: m-grouped FP8 over m_indices and over psum ends (nt and
    nn), the k-grouped FP8 and BF16 weight gradients (host group sizes)."""
    by_rows = torch.zeros(256, 128, dtype=torch.bfloat16)
    hal.m_grouped_fp8_gemm_nt_contiguous(a, grouped, by_rows, m_indices)
    by_ends = torch.zeros(256, 128, dtype=torch.bfloat16)
    hal.m_grouped_fp8_gemm_nt_contiguous(a, grouped, by_ends, ends, use_psum_layout=True)
    transposed = (grouped[0].transpose(1, 2).contiguous(), grouped[1].transpose(1, 2).contiguous())
    by_rows_nn = torch.zeros(256, 128, dtype=torch.bfloat16)
    hal.m_grouped_fp8_gemm_nn_contiguous(a, transposed, by_rows_nn, m_indices)
    grads_bf16 = torch.zeros(2, 16, 8)
    hal.k_grouped_bf16_gemm_tn_contiguous(x, y, grads_bf16, [128, 256], torch.tensor([128, 256], dtype=torch.int32), c=c)
    grads_fp8 = torch.zeros(2, 16, 8)
    hal.k_grouped_fp8_gemm_tn_contiguous(ka, kb, grads_fp8, [128, 256], torch.tensor([128, 256], dtype=torch.int32), c=c)
    return by_rows, by_ends, by_rows_nn, grads_bf16, grads_fp8


def test_grouped_current_names_compile_fullgraph_and_match_eager():
    g = torch.Generator().manual_seed(4)
    a = hal.per_token_cast_to_fp8(torch.randn(256, 256, generator=g))
    experts = [hal.per_block_cast_to_fp8(torch.randn(128, 256, generator=g)) for _ in range(2)]
    grouped = (torch.stack([e[0] for e in experts]), torch.stack([e[1] for e in experts]))
    m_indices = torch.tensor([0] * 100 + [-1] * 28 + [1] * 128, dtype=torch.int32)
    ends = torch.tensor([100, 250], dtype=torch.int32)
    x, y, c = torch.randn(384, 16, generator=g).bfloat16(), torch.randn(384, 8, generator=g).bfloat16(), torch.randn(2, 16, 8, generator=g)
    ka = (torch.randn(384, 16, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 16, generator=g) + 0.5)
    kb = (torch.randn(384, 8, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 8, generator=g) + 0.5)
    args = (a, grouped, m_indices, ends, x, y, c, ka, kb)
    eager = moe_weight_and_grouped_gemms(*args)
    torch._dynamo.reset()
    compiled = torch.compile(moe_weight_and_grouped_gemms, backend="aot_eager", fullgraph=True)(*args)
    assert all(torch.equal(e, got) for e, got in zip(eager, compiled))


@pytest.mark.parametrize("kwargs, error", [
    ({"recipe": (1, 64, 128)}, hal.ValueRangeError),
    ({"recipe_b": (64, 128)}, hal.ValueRangeError),
    ({"recipe_a": (128, 128)}, hal.ValueRangeError),
])
def test_recipes_are_checked_inside_compiled_graphs(kwargs, error):
    g = torch.Generator().manual_seed(5)
    a = hal.per_token_cast_to_fp8(torch.randn(16, 256, generator=g))
    w = hal.per_block_cast_to_fp8(torch.randn(128, 256, generator=g))

    def gemm(d):
        hal.fp8_gemm_nt(a, w, d, **kwargs)
        return d

    torch._dynamo.reset()
    with pytest.raises(error, match="recipe"):
        torch.compile(gemm, backend="aot_eager", fullgraph=True)(torch.empty(16, 128, dtype=torch.bfloat16))


def test_weight_gradient_gemms_accumulating_in_place_compile_fullgraph():
    """c given as d itself (DeepGEMM's in-place accumulation): the compiled graph matches eager."""
    from hal.compat import deep_gemm

    g = torch.Generator().manual_seed(6)
    lhs = (torch.randn(16, 256, generator=g).to(torch.float8_e4m3fn), torch.rand(16, 2, generator=g) + 0.5)
    rhs = (torch.randn(8, 256, generator=g).to(torch.float8_e4m3fn), torch.rand(8, 2, generator=g) + 0.5)
    ka = (torch.randn(384, 16, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 16, generator=g) + 0.5)
    kb = (torch.randn(384, 8, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 8, generator=g) + 0.5)

    def accumulate(out, grads):
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out)
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(ka, kb, grads, [128, 256], torch.tensor([128, 256], dtype=torch.int32), c=grads)
        return out, grads

    start = (torch.randn(16, 8, generator=g), torch.randn(2, 16, 8, generator=g))
    eager = accumulate(*(t.clone() for t in start))
    torch._dynamo.reset()
    compiled = torch.compile(accumulate, backend="aot_eager", fullgraph=True)(*(t.clone() for t in start))
    assert all(torch.equal(e, c) for e, c in zip(eager, compiled))


def test_k_grouped_gemms_with_the_psum_layout_compile_fullgraph():
    """Group ends on the device, read on the host when the graph runs (one opaque node each)."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(384, 16, generator=g).bfloat16(), torch.randn(384, 8, generator=g).bfloat16()
    ka = (torch.randn(384, 16, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 16, generator=g) + 0.5)
    kb = (torch.randn(384, 8, generator=g).to(torch.float8_e4m3fn), torch.rand(3, 8, generator=g) + 0.5)
    ends = torch.tensor([128, 384], dtype=torch.int32)

    def grads(bf16, fp8):
        hal.k_grouped_bf16_gemm_tn_contiguous(x, y, bf16, None, ends, c=bf16, use_psum_layout=True)
        hal.k_grouped_fp8_gemm_tn_contiguous(ka, kb, fp8, None, ends, c=fp8, use_psum_layout=True)
        return bf16, fp8

    start = (torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g))
    eager = grads(*(t.clone() for t in start))
    torch._dynamo.reset()
    compiled = torch.compile(grads, backend="aot_eager", fullgraph=True)(*(t.clone() for t in start))
    assert all(torch.equal(e, c) for e, c in zip(eager, compiled))
