"""MLA decode (``hal.flash_mla_with_kvcache``, ``hal.get_mla_metadata``) against an independent
float64 computation, the split-KV schedule, and every argument check.

The float64 oracle below is written from the contract in ``ops/mla.py``'s docstring only: keys
are gathered token by token through the block table, softmax is done in float64, and causal
query i of s_q sees keys ``0 .. seqlen - s_q + i``. It does not use ``hal.ops.mla_reference``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import hal
from hal.ops.mla_schedule import schedule_mla_splits

D_QK = 576
D_V = 512
PAGE = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """FlashMLA's metric: 1 - 2 * sum(x * y) / max(sum(x * x + y * y), 1e-12), in float64."""
    x, y = x.double(), y.double()
    denominator = max(float((x * x + y * y).sum()), 1e-12)
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ---------------------------------------------------------------------------------------------


def make_inputs(
    seqlens: list[int], s_q: int, h_q: int, dtype: torch.dtype, *, h_kv: int = 1, seed: int = 0, spare_blocks: int = 3
) -> dict[str, torch.Tensor]:
    """Random q / paged k_cache / shuffled block table for the given sequence lengths.

    The physical pages are a random permutation (never the identity), the block table has at
    least one unused trailing column, and unused entries hold -1 or block ids far out of range.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(seqlens)
    pages = [_cdiv(s, PAGE) for s in seqlens]
    max_pages = max(pages) + 1
    num_blocks = sum(pages) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    if torch.equal(perm, torch.arange(num_blocks)):
        perm = perm.flip(0)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32)
    garbage = torch.randint(num_blocks + 1, 10_000, (batch, max_pages), generator=gen, dtype=torch.int32)
    block_table.copy_(torch.where(torch.rand(batch, max_pages, generator=gen) < 0.5, -1, garbage))
    cursor = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[cursor : cursor + n].to(torch.int32)
        cursor += n
    q = torch.randn(batch, s_q, h_q, D_QK, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, PAGE, h_kv, D_QK, generator=gen).to(dtype)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    return {"q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens}


def mla_float64(
    q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 MLA decode: (out [b, s_q, h_q, 512], lse [b, h_q, s_q])."""
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(batch, s_q, h_q, D_V, dtype=torch.float64)
    lse = torch.full((batch, h_q, s_q), math.inf, dtype=torch.float64)
    for b in range(batch):
        seqlen = int(cache_seqlens[b])
        if seqlen == 0:
            continue
        keys = torch.stack(
            [k_cache[int(block_table[b, t // PAGE]), t % PAGE] for t in range(seqlen)]
        ).double()  # [seqlen, h_kv, d]
        for i in range(s_q):
            visible = seqlen - s_q + i + 1 if causal else seqlen
            for h in range(h_q):
                k = keys[:visible, h // group]  # [visible, d]
                scores = (k @ q[b, i, h].double()) * scale
                top = scores.max()
                weights = torch.exp(scores - top)
                total = weights.sum()
                out[b, i, h] = (weights / total) @ k[:, :D_V]
                lse[b, h, i] = top + torch.log(total)
    return out, lse


def run_mla(inputs: dict[str, torch.Tensor], s_q: int, h_q: int, h_kv: int = 1, **kwargs):
    with hal.use_backend("reference"):
        metadata, num_splits = hal.get_mla_metadata(inputs["cache_seqlens"], s_q * h_q // h_kv, h_kv)
        return hal.flash_mla_with_kvcache(
            inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], D_V, metadata, num_splits, **kwargs
        )


def check_against_oracle(out, lse, inputs, scale, causal):
    batch, s_q, h_q, _ = inputs["q"].shape
    assert out.shape == (batch, s_q, h_q, D_V)
    assert out.dtype == inputs["q"].dtype
    assert lse.shape == (batch, h_q, s_q)
    assert lse.dtype == torch.float32
    ref_out, ref_lse = mla_float64(inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"], scale, causal)
    assert cos_diff(out, ref_out) < 1e-5
    finite = torch.isfinite(ref_lse)  # +inf marks queries that see no key (empty sequences)
    assert torch.equal(torch.isposinf(lse), ~finite)
    assert cos_diff(lse[finite], ref_lse[finite]) < 1e-5
    # Elementwise too: out within the rounding of q's dtype, lse within float32 accumulation.
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=1e-2 * float(ref_out.abs().max()))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    return ref_out, ref_lse


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

SEQLEN_SETS = {
    "edges": [1, 63, 64, 65],
    "mixed": [130, 7, 200],
}


@pytest.mark.parametrize("seqlens_id", sorted(SEQLEN_SETS))
@pytest.mark.parametrize("h_q", [16, 32])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_float64(dtype, s_q, causal, h_q, seqlens_id):
    seqlens = SEQLEN_SETS[seqlens_id]
    if causal:  # causal needs at least s_q keys per sequence
        seqlens = [max(s, s_q) for s in seqlens]
    seed = 1000 * s_q + 100 * causal + h_q + 10 * (dtype == torch.float16) + 5000 * (seqlens_id == "mixed")
    inputs = make_inputs(seqlens, s_q, h_q, dtype, seed=seed)
    out, lse = run_mla(inputs, s_q, h_q, causal=causal)
    check_against_oracle(out, lse, inputs, D_QK**-0.5, causal and s_q > 1)


def test_causal_masks_the_last_keys():
    """With s_q > 1, causal and non-causal differ, and only the earlier queries change."""
    inputs = make_inputs([70, 129], 3, 16, torch.bfloat16, seed=11)
    full, _ = run_mla(inputs, 3, 16, causal=False)
    masked, _ = run_mla(inputs, 3, 16, causal=True)
    assert torch.equal(full[:, -1], masked[:, -1])  # the last query sees every key either way
    assert not torch.equal(full[:, 0], masked[:, 0])


def test_causal_has_no_effect_with_one_query():
    inputs = make_inputs([5, 100], 1, 16, torch.float16, seed=12)
    a = run_mla(inputs, 1, 16, causal=False)
    b = run_mla(inputs, 1, 16, causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("s_q", [1, 2])
def test_grouped_kv_heads(s_q):
    """h_kv > 1 (h_q a multiple of h_kv): query head h uses KV head h // (h_q // h_kv)."""
    inputs = make_inputs([65, 3, 128], s_q, 16, torch.bfloat16, h_kv=2, seed=13)
    out, lse = run_mla(inputs, s_q, 16, h_kv=2, causal=True)
    check_against_oracle(out, lse, inputs, D_QK**-0.5, s_q > 1)


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_empty_sequence_gives_zero_out_and_infinite_lse(dtype, s_q):
    inputs = make_inputs([0, 70, 0, 5], s_q, 16, dtype, seed=21)
    out, lse = run_mla(inputs, s_q, 16, causal=False)
    for b in (0, 2):
        assert torch.equal(out[b], torch.zeros_like(out[b]))
        assert bool(torch.isposinf(lse[b]).all())
    for b in (1, 3):
        assert bool(torch.isfinite(lse[b]).all())
    check_against_oracle(out, lse, inputs, D_QK**-0.5, False)


def test_empty_sequences_need_no_cache_blocks():
    """A sequence of length 0 uses no page, so its block-table entries are ignored: with every
    sequence empty, a k_cache of zero blocks (and -1 in the block table) is a valid input."""
    gen = torch.Generator().manual_seed(22)
    q = torch.randn(2, 1, 16, D_QK, generator=gen).to(torch.bfloat16)
    k_cache = torch.empty(0, PAGE, 1, D_QK, dtype=torch.bfloat16)
    block_table = torch.full((2, 1), -1, dtype=torch.int32)
    cache_seqlens = torch.zeros(2, dtype=torch.int32)
    with hal.use_backend("reference"):
        metadata, num_splits = hal.get_mla_metadata(cache_seqlens, 16, 1)
        out, lse = hal.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, D_V, metadata, num_splits)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool(torch.isposinf(lse).all())


def test_default_softmax_scale_is_576_rsqrt():
    inputs = make_inputs([100, 64, 1], 2, 16, torch.bfloat16, seed=31)
    default = run_mla(inputs, 2, 16)
    explicit = run_mla(inputs, 2, 16, softmax_scale=576**-0.5)
    assert torch.equal(default[0], explicit[0])
    assert torch.equal(default[1], explicit[1])
    check_against_oracle(*default, inputs, 576**-0.5, False)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2])
def test_custom_softmax_scale(scale):
    inputs = make_inputs([100, 64, 2], 2, 16, torch.float16, seed=32)
    default_out, default_lse = run_mla(inputs, 2, 16, causal=True)
    out, lse = run_mla(inputs, 2, 16, softmax_scale=scale, causal=True)
    assert not torch.equal(out, default_out)
    assert not torch.allclose(lse, default_lse)
    check_against_oracle(out, lse, inputs, float(scale), True)


def test_result_does_not_depend_on_the_schedule():
    """Any schedule from schedule_mla_splits must give the same output (module contract)."""
    inputs = make_inputs([300, 2, 64, 129], 2, 32, torch.bfloat16, seed=41)
    seqlens = inputs["cache_seqlens"]
    results = []
    for num_sms in (1, 3, 132):
        metadata, num_splits = schedule_mla_splits(seqlens, 64, 1, num_sms=num_sms)
        with hal.use_backend("reference"):
            results.append(
                hal.flash_mla_with_kvcache(
                    inputs["q"], inputs["k_cache"], inputs["block_table"], seqlens, D_V, metadata, num_splits, causal=True
                )
            )
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(lse, results[0][1])


# ---------------------------------------------------------------------------------------------
# The split-KV schedule
# ---------------------------------------------------------------------------------------------


def test_schedule_hand_worked_example():
    """seqlens [100, 640, 1] -> KV blocks [2, 10, 1]; num_sms=4, 32 query rows per KV head -> 4 parts.

    total = (2+5) + (10+5) + (1+5) = 28 block units; payload = ceil(28 / 4) + 5 = 12 per part.
    part 0: seq 0 whole (7 units, 5 left; seq 1 needs 15 and 5 - 5 = 0 blocks fit) -> ends at (0, 100).
    part 1: seq 1 needs 15 > 12 -> takes 12 - 5 = 7 blocks (split 1) -> ends at (1, 7 * 64 = 448).
    part 2: seq 1 from block 7 (split index 1): 3 blocks + 5 = 8 <= 12 -> seq 1 has 2 splits;
            4 units left, seq 2 needs 6, 4 - 5 <= 0 -> ends at (1, 640).
    part 3: seq 2 whole -> ends at (2, 1).
    num_splits = prefix sums of splits [1, 2, 1] = [0, 1, 3, 4].
    """
    metadata, num_splits = schedule_mla_splits(torch.tensor([100, 640, 1], dtype=torch.int32), 32, 1, num_sms=4)
    assert metadata.dtype == torch.int32 and num_splits.dtype == torch.int32
    assert metadata.tolist() == [
        [0, 0, 0, 100, 0, 0, 0, 0],
        [1, 0, 1, 448, 0, 0, 0, 0],
        [1, 448, 1, 640, 1, 0, 0, 0],
        [2, 0, 2, 1, 0, 0, 0, 0],
    ]
    assert num_splits.tolist() == [0, 1, 3, 4]


def test_schedule_hand_worked_example_two_parts():
    """seqlens [64, 65] -> blocks [1, 2]; num_sms=4, 128 query rows (2 tiles), h_kv=1 -> 2 parts.

    total = 6 + 7 = 13; payload = ceil(13 / 2) + 5 = 12.
    part 0: seq 0 (6 units, 6 left); seq 1 needs 7 > 6 -> 6 - 5 = 1 block -> ends at (1, 64).
    part 1: seq 1 from block 1, split 1: 1 + 5 = 6 <= 12 -> done, seq 1 has 2 splits; ends at (1, 65).
    """
    metadata, num_splits = schedule_mla_splits(torch.tensor([64, 65], dtype=torch.int32), 128, 1, num_sms=4)
    assert metadata.tolist() == [[0, 0, 1, 64, 0, 0, 0, 0], [1, 64, 1, 65, 1, 0, 0, 0]]
    assert num_splits.tolist() == [0, 1, 3]


def _coverage(metadata: torch.Tensor, seqlens: list[int]) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """(every (batch, block) each metadata row covers, rows touching each batch element)."""
    covered: list[tuple[int, int]] = []
    rows_of: dict[int, list[int]] = {}
    for r, (bb, bt, eb, et, _bs, *_pad) in enumerate(metadata.tolist()):
        for b in range(bb, eb + 1):
            start = bt if b == bb else 0
            end = et if b == eb else seqlens[b]
            blocks = range(start // PAGE, _cdiv(end, PAGE))
            if len(blocks):
                rows_of.setdefault(b, []).append(r)
            covered.extend((b, j) for j in blocks)
    return covered, rows_of


@pytest.mark.parametrize("num_sms", [1, 2, 4, 7, 132])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_invariants(num_sms, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    seqlens = torch.randint(0, 700, (batch,), generator=gen, dtype=torch.int32)
    seqlens[0] = 0 if seed == 1 else seqlens[0]
    values = seqlens.tolist()
    metadata, num_splits = schedule_mla_splits(seqlens, 32, 1, num_sms=num_sms)

    assert metadata.shape == (num_sms, 8)
    assert num_splits.shape == (batch + 1,)
    splits = num_splits.tolist()
    assert splits[0] == 0
    assert all(b >= a for a, b in zip(splits, splits[1:]))
    assert bool((metadata[:, 5:] == 0).all())

    covered, rows_of = _coverage(metadata, values)
    expected = [(b, j) for b, s in enumerate(values) for j in range(_cdiv(s, PAGE))]
    assert sorted(covered) == expected  # every block exactly once
    for b, s in enumerate(values):
        per_seq = splits[b + 1] - splits[b]
        if s == 0:
            assert per_seq == 1
        else:
            assert per_seq == len(rows_of[b]) >= 1
    # begin_split is the split index of the row's first sequence
    for b, rows in rows_of.items():
        for index, r in enumerate(rows):
            if int(metadata[r, 0]) == b:
                assert int(metadata[r, 4]) == index


@pytest.mark.parametrize(
    "num_sms, num_heads_k, tokens_per_head_k",
    [(132, 1, 16), (132, 1, 64), (132, 1, 65), (132, 1, 128), (78, 2, 64), (4, 2, 130), (1, 1, 512), (8, 16, 32)],
)
def test_num_sm_parts(num_sms, num_heads_k, tokens_per_head_k):
    expected = max(num_sms // num_heads_k // _cdiv(tokens_per_head_k, 64), 1)
    metadata, _ = schedule_mla_splits(torch.tensor([10, 300], dtype=torch.int32), tokens_per_head_k, num_heads_k, num_sms=num_sms)
    assert metadata.shape == (expected, 8)


def test_get_mla_metadata_on_cpu_uses_hopper_sm_count():
    seqlens = torch.tensor([1, 63, 64, 65, 1000], dtype=torch.int32)
    with hal.use_backend("reference"):
        metadata, num_splits = hal.get_mla_metadata(seqlens, 2 * 32, 1)
    assert metadata.shape == (132, 8) and metadata.dtype == torch.int32
    assert num_splits.shape == (6,) and num_splits.dtype == torch.int32
    ref_meta, ref_splits = schedule_mla_splits(seqlens, 64, 1, num_sms=132)
    assert torch.equal(metadata, ref_meta) and torch.equal(num_splits, ref_splits)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _valid_call_args() -> dict:
    inputs = make_inputs([65, 1, 128], 2, 16, torch.bfloat16, seed=51)
    with hal.use_backend("reference"):
        metadata, num_splits = hal.get_mla_metadata(inputs["cache_seqlens"], 2 * 16, 1)
    return dict(
        q=inputs["q"], k_cache=inputs["k_cache"], block_table=inputs["block_table"], cache_seqlens=inputs["cache_seqlens"],
        head_dim_v=D_V, tile_scheduler_metadata=metadata, num_splits=num_splits,
    )


def _non_contiguous_q(args):
    wide = torch.randn(*args["q"].shape[:-1], 2 * D_QK, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    return {"q": wide[..., ::2]}


def _bad_block(value):
    def mutate(args):
        table = args["block_table"].clone()
        table[1, 0] = value  # sequence 1 (seqlen 1) uses exactly its first page
        return {"block_table": table}
    return mutate


INVALID_CALLS = [
    ("q_rank", lambda a: {"q": a["q"][0]}, hal.ShapeError, ValueError, "q"),
    ("q_head_dim", lambda a: {"q": a["q"][..., :512].contiguous()}, hal.ShapeError, ValueError, "q"),
    ("q_float32", lambda a: {"q": a["q"].float()}, hal.DTypeError, TypeError, "q"),
    ("q_not_a_tensor", lambda a: {"q": a["q"].tolist()}, hal.DTypeError, TypeError, "q"),
    ("q_last_dim_strided", _non_contiguous_q, hal.LayoutError, ValueError, "q"),
    ("k_cache_dtype", lambda a: {"k_cache": a["k_cache"].half()}, hal.DTypeError, TypeError, "k_cache"),
    ("k_cache_fp8", lambda a: {"k_cache": a["k_cache"].to(torch.float8_e4m3fn)}, hal.DTypeError, TypeError, "k_cache"),
    ("k_cache_page_size", lambda a: {"k_cache": a["k_cache"][:, :32]}, hal.ShapeError, ValueError, "k_cache"),
    ("k_cache_head_dim", lambda a: {"k_cache": a["k_cache"][..., :512]}, hal.ShapeError, ValueError, "k_cache"),
    ("h_q_not_multiple_of_h_kv", lambda a: {"k_cache": a["k_cache"].expand(-1, -1, 3, -1)}, hal.ShapeError, ValueError, "k_cache"),
    ("block_table_int64", lambda a: {"block_table": a["block_table"].long()}, hal.DTypeError, TypeError, "block_table"),
    ("block_table_batch", lambda a: {"block_table": a["block_table"][:2]}, hal.ShapeError, ValueError, "block_table"),
    ("block_table_rank", lambda a: {"block_table": a["block_table"].flatten()}, hal.ShapeError, ValueError, "block_table"),
    ("cache_seqlens_shape", lambda a: {"cache_seqlens": a["cache_seqlens"][:, None]}, hal.ShapeError, ValueError, "cache_seqlens"),
    ("cache_seqlens_batch", lambda a: {"cache_seqlens": a["cache_seqlens"][:2]}, hal.ShapeError, ValueError, "cache_seqlens"),
    ("cache_seqlens_int64", lambda a: {"cache_seqlens": a["cache_seqlens"].long()}, hal.DTypeError, TypeError, "cache_seqlens"),
    ("seqlen_beyond_capacity", lambda a: {"cache_seqlens": torch.tensor([65, 1, a["block_table"].shape[1] * 64 + 1], dtype=torch.int32)},
     hal.ValueRangeError, ValueError, "cache_seqlens"),
    ("seqlen_negative", lambda a: {"cache_seqlens": torch.tensor([65, -1, 128], dtype=torch.int32)},
     hal.ValueRangeError, ValueError, "cache_seqlens"),
    ("block_id_too_large", _bad_block(10**6), hal.ValueRangeError, ValueError, "block_table"),
    ("block_id_equal_num_blocks", lambda a: _bad_block(a["k_cache"].shape[0])(a), hal.ValueRangeError, ValueError, "block_table"),
    ("block_id_negative", _bad_block(-1), hal.ValueRangeError, ValueError, "block_table"),
    ("head_dim_v", lambda a: {"head_dim_v": 576}, hal.ValueRangeError, ValueError, "head_dim_v"),
    ("head_dim_v_float", lambda a: {"head_dim_v": 512.0}, hal.DTypeError, TypeError, "head_dim_v"),
    ("metadata_width", lambda a: {"tile_scheduler_metadata": a["tile_scheduler_metadata"][:, :4]},
     hal.ShapeError, ValueError, "tile_scheduler_metadata"),
    ("metadata_dtype", lambda a: {"tile_scheduler_metadata": a["tile_scheduler_metadata"].long()},
     hal.DTypeError, TypeError, "tile_scheduler_metadata"),
    ("num_splits_length", lambda a: {"num_splits": a["num_splits"][:-1]}, hal.ShapeError, ValueError, "num_splits"),
    ("num_splits_dtype", lambda a: {"num_splits": a["num_splits"].long()}, hal.DTypeError, TypeError, "num_splits"),
    ("softmax_scale_zero", lambda a: {"softmax_scale": 0.0}, hal.ValueRangeError, ValueError, "softmax_scale"),
    ("softmax_scale_negative", lambda a: {"softmax_scale": -0.1}, hal.ValueRangeError, ValueError, "softmax_scale"),
    ("softmax_scale_nan", lambda a: {"softmax_scale": math.nan}, hal.ValueRangeError, ValueError, "softmax_scale"),
    ("softmax_scale_inf", lambda a: {"softmax_scale": math.inf}, hal.ValueRangeError, ValueError, "softmax_scale"),
    ("softmax_scale_bool", lambda a: {"softmax_scale": True}, hal.ValueRangeError, ValueError, "softmax_scale"),
    ("block_table_other_device", lambda a: {"block_table": a["block_table"].to("meta")}, hal.DeviceError, ValueError, "block_table"),
    ("num_splits_other_device", lambda a: {"num_splits": a["num_splits"].to("meta")}, hal.DeviceError, ValueError, "num_splits"),
]


@pytest.mark.parametrize(
    "mutate, error, builtin, argument", [case[1:] for case in INVALID_CALLS], ids=[case[0] for case in INVALID_CALLS]
)
def test_flash_mla_rejects(mutate, error, builtin, argument):
    args = _valid_call_args()
    args.update(mutate(args))
    with hal.use_backend("reference"):
        with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
            hal.flash_mla_with_kvcache(**args)
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, hal.ArgumentError)
    assert info.value.argument == argument
    assert info.value.op == "flash_mla_with_kvcache"


def test_valid_call_args_are_valid():
    """The base of the rejection cases runs (so each case fails for its own mutation only)."""
    with hal.use_backend("reference"):
        out, lse = hal.flash_mla_with_kvcache(**_valid_call_args())
    assert out.shape == (3, 2, 16, D_V) and lse.shape == (3, 16, 2)


def test_unused_block_table_entries_are_not_checked():
    """Entries past a sequence's last page may hold anything (the fixture already has -1 and huge ids)."""
    args = _valid_call_args()
    args["block_table"][:, -1] = -7
    args["block_table"][1, 1:] = 2**31 - 1
    with hal.use_backend("reference"):
        hal.flash_mla_with_kvcache(**args)


INVALID_METADATA = [
    ("seqlens_int64", lambda s: (s.long(), 16, 1), hal.DTypeError, TypeError, "cache_seqlens"),
    ("seqlens_2d", lambda s: (s[None], 16, 1), hal.ShapeError, ValueError, "cache_seqlens"),
    ("seqlens_list", lambda s: (s.tolist(), 16, 1), hal.DTypeError, TypeError, "cache_seqlens"),
    ("tokens_zero", lambda s: (s, 0, 1), hal.ValueRangeError, ValueError, "num_q_tokens_per_head_k"),
    ("tokens_float", lambda s: (s, 16.0, 1), hal.DTypeError, TypeError, "num_q_tokens_per_head_k"),
    ("heads_zero", lambda s: (s, 16, 0), hal.ValueRangeError, ValueError, "num_heads_k"),
    ("heads_bool", lambda s: (s, 16, True), hal.DTypeError, TypeError, "num_heads_k"),
]


@pytest.mark.parametrize(
    "mutate, error, builtin, argument", [case[1:] for case in INVALID_METADATA], ids=[case[0] for case in INVALID_METADATA]
)
def test_get_mla_metadata_rejects(mutate, error, builtin, argument):
    seqlens = torch.tensor([3, 70], dtype=torch.int32)
    with pytest.raises(error, match=re.escape(f"'{argument}'")) as info:
        hal.get_mla_metadata(*mutate(seqlens))
    assert isinstance(info.value, builtin)
    assert info.value.argument == argument
