"""The OpenCL backend certified: every quick conformance case, plus the paths the catalogue does not reach
on a small CPU (split-KV combine, several KV heads, mixed groups in one GEMM tile, cast dtypes, nodes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pyopencl")
from hal.backends.opencl.device import list_devices  # noqa: E402

if not list_devices():
    pytest.skip("no OpenCL device", allow_module_level=True)

import hal  # noqa: E402
from pinned_features import PINNED_OUT, lacking  # noqa: E402
from hal.backends.opencl import ep_layout, fp8_cast, gemm_fp8, mla_decode  # noqa: E402
from hal.backends.opencl.device import runtime  # noqa: E402
from hal.conformance.catalogue import select_cases  # noqa: E402
from hal.conformance.cases_mla import MlaDecodeFamily  # noqa: E402
from hal.conformance.metrics import cos_diff  # noqa: E402
from hal.conformance.runner import run_backend  # noqa: E402
from hal.operator import get_operator  # noqa: E402
from hal.ops.ep import dispatch_layout_reference  # noqa: E402
from hal.ops.fp8_quant import per_block_cast_reference, per_token_cast_reference  # noqa: E402
from hal.ops.gemm_reference import blockwise_fp8_matmul  # noqa: E402
from hal.ops.mla_reference import mla_decode_reference  # noqa: E402


def test_every_quick_conformance_case_passes():
    # Operators the backend does not implement (newer EP hooks) are the catalogue's, not this backend's.
    backend = hal.get_backend("opencl")
    cases = [c for c in select_cases(quick=True) if backend.implements(get_operator(c.op).hook)]
    assert {c.op for c in cases} >= {"mla_decode", "gemm_fp8_nt", "m_grouped_gemm_fp8_nt_contiguous", "m_grouped_gemm_fp8_nt_masked",
                                     "per_token_cast_to_fp8", "per_block_cast_to_fp8", "ep_dispatch_layout"}
    results = run_backend("opencl", cases)
    # a case is excused only for a feature the backend's pins leave out, and it must say which
    failed = [f"{r.case_id}: {r.status} {r.reason}" for r in results if not r.passed
              and not (r.status == "unsupported" and any(f"uses: {name}" in r.reason for name in PINNED_OUT["opencl"]))]
    assert not failed, "\n".join(failed)
    assert lacking("opencl") <= PINNED_OUT["opencl"]
    assert {r.device for r in results} == {"cpu"}


def test_hal_backends_json_shows_opencl_available_with_its_device():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    result = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    opencl = {b["name"]: b for b in json.loads(result.stdout)["backends"]}["opencl"]
    assert opencl["available"] and opencl["device"] == runtime().name
    assert set(opencl["operators"]) >= {"mla_decode", "gemm_fp8_nt", "per_token_cast_to_fp8", "ep_dispatch_layout"}


@pytest.mark.parametrize(
    "seqlens, s_q, causal, pages_per_chunk",
    [
        ([300, 17, 0, 640], 2, True, 1),  # every sequence split into pages, an empty one
        ([65, 129], 2, True, 1),  # a last chunk that query 0 cannot see: its partial is empty
        ([130, 1, 700], 1, False, 2),
    ],
)
def test_mla_split_chunks_combine_to_the_reference(seqlens, s_q, causal, pages_per_chunk):
    inputs = MlaDecodeFamily().build({"seqlens": seqlens, "s_q": s_q, "h_q": 16, "dtype": "bf16"}, torch.Generator().manual_seed(1))
    args = (inputs["q"], inputs["k_cache"], inputs["block_table"], inputs["cache_seqlens"])
    assert mla_decode.plan_chunks(seqlens, pages_per_chunk).combines.shape[0] > 0, "the case must exercise the combine"
    out, lse = mla_decode.mla_decode(*args, 576**-0.5, causal, pages_per_chunk=pages_per_chunk)
    want_out, want_lse = mla_decode_reference(*args, 512, None, None, 576**-0.5, causal)
    finite = torch.isfinite(want_lse)
    assert cos_diff(out.float(), want_out.float()) < 1e-5 and cos_diff(lse[finite], want_lse[finite]) < 1e-5
    assert torch.equal(lse[~finite], want_lse[~finite]) and not torch.isnan(out).any()


def test_model1_scale_bytes_decode_as_ue8m0_says():
    """MODEL1 scale byte 0 is 2^-127 (a subnormal factor), 255 is NaN: rows naming such a token get
    the reference's values and its NaN, rows that do not are untouched by it."""
    from hal.ops.mla_fp8_cache import MODEL1_DATA_BYTES, MODEL1_DIM, model1_pages, quantize_model1_kv_cache
    from hal.ops.mla_v2_reference import mla_decode_v2_reference

    generator = torch.Generator().manual_seed(8)
    blocks, page = 3, 5
    cache = quantize_model1_kv_cache(torch.randn(blocks, page, 1, MODEL1_DIM, generator=generator).to(torch.bfloat16))
    scales = model1_pages(cache)[:, page * MODEL1_DATA_BYTES :].view(blocks, page, 8)  # a view: writes land in the cache
    scales[0, 1, 2] = 0  # token 1: one tile scaled by 2^-127
    scales[1, 3, 6] = 255  # token 8: one tile NaN
    indices = torch.tensor([[[1, -1, -1, -1]], [[8, 0, 2, 14]], [[1, 4, 7, -1]]], dtype=torch.int32)
    q = torch.randn(3, 1, 16, MODEL1_DIM, generator=generator).to(torch.bfloat16)
    args = (q, cache, None, None, 512, MODEL1_DIM**-0.5, False, True, indices, None, None, None, None, None)
    out, lse = hal.get_backend("opencl").impl("hal_mla_decode_v2")(*args)
    want_out, want_lse = mla_decode_v2_reference(*args)
    # row 0 names token 1 alone: out is its key, the 2^-127 tile (channels 128..191) exactly
    assert torch.equal(out[0], want_out[0]) and bool((out[0, ..., 128:192] != 0).any())
    assert torch.isnan(out[1]).all() and torch.isnan(want_out[1]).all()  # token 8's NaN reaches every head of the row naming it
    assert cos_diff(out[2].float(), want_out[2].float()) < 1e-5 and cos_diff(lse[2], want_lse[2]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_with_several_kv_heads(dtype):
    generator = torch.Generator().manual_seed(2)
    k_cache = torch.randn(10, 64, 2, 576, generator=generator).to(dtype)
    block_table = torch.randperm(10, generator=generator)[:8].reshape(2, 4).to(torch.int32)
    q = torch.randn(2, 2, 8, 576, generator=generator).to(dtype)
    seqlens = torch.tensor([70, 200], dtype=torch.int32)
    for pages in (None, 1):
        out, lse = mla_decode.mla_decode(q, k_cache, block_table, seqlens, 0.05, True, pages_per_chunk=pages)
        want_out, want_lse = mla_decode_reference(q, k_cache, block_table, seqlens, 512, None, None, 0.05, True)
        assert out.dtype == dtype and cos_diff(out.float(), want_out.float()) < 1e-5 and cos_diff(lse, want_lse) < 1e-5


def _operands(rows: int, n: int, k: int, groups: int, generator: torch.Generator):
    a, sa = per_token_cast_reference(torch.randn(rows, k, generator=generator))
    parts = [per_block_cast_reference(torch.randn(n, k, generator=generator)) for _ in range(groups)]
    return a, sa, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def test_contiguous_gemm_computes_each_row_with_its_own_group_and_skips_padding():
    # Rows of several groups inside one tile and -1 rows anywhere: outside DeepGEMM's layout, still exact per row.
    generator = torch.Generator().manual_seed(3)
    a, sa, b, sb = _operands(128, 96, 256, 3, generator)
    m_indices = torch.randint(-1, 3, (128,), generator=generator, dtype=torch.int32)
    out = torch.full((128, 96), math.nan, dtype=torch.bfloat16)
    gemm_fp8.m_grouped_contiguous(a, sa, b, sb, out, m_indices)
    for g in range(3):
        rows = m_indices == g
        want = blockwise_fp8_matmul(a[rows], sa[rows], b[g], sb[g]).to(torch.bfloat16)
        assert cos_diff(out[rows].float(), want.float()) < 1e-6
    assert torch.isnan(out[m_indices < 0]).all(), "padding rows are never written"


def test_masked_gemm_leaves_rows_beyond_masked_m_untouched():
    generator = torch.Generator().manual_seed(4)
    a0, sa0, b, sb = _operands(2 * 40, 72, 128, 2, generator)
    a, sa = a0.view(2, 40, 128), sa0.view(2, 40, 1)
    out = torch.full((2, 40, 72), 7.0, dtype=torch.bfloat16)
    gemm_fp8.m_grouped_masked(a, sa, b, sb, out, torch.tensor([17, 0], dtype=torch.int32), expected_m=8)
    want = blockwise_fp8_matmul(a[0, :17], sa[0, :17], b[0], sb[0]).to(torch.bfloat16)
    assert cos_diff(out[0, :17].float(), want.float()) < 1e-6
    assert (out[0, 17:] == 7).all() and (out[1] == 7).all()


@pytest.mark.parametrize("sa_row, sb_row, want", [
    ((math.inf, 3e38), (1.0, 2.0), math.nan),  # -inf from block 0, (1 * 3e38) * 2 = +inf from block 1: NaN
    ((1e38, 3e38), (1.0, 1.2), math.inf),  # (1 * 3e38) * 1.2 overflows fp32; an fma would keep 2.6e38
])
def test_fp8_gemm_scale_promotion_rounds_each_product_as_the_contract_does(sa_row, sb_row, want):
    """The promotion is (partial * sa) * sb rounded to fp32, then added: a compiler that fuses it
    into one fma never overflows where fp32 does (two 128-K blocks, partials -1 and +1)."""
    a = torch.zeros(1, 256)
    b = torch.zeros(1, 256)
    a[0, 0], b[0, 0], a[0, 128], b[0, 128] = -1.0, 1.0, 1.0, 1.0
    a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa, sb = torch.tensor([sa_row]), torch.tensor([sb_row])

    def same(got: torch.Tensor) -> bool:
        return math.isnan(float(got)) if math.isnan(want) else float(got) == want

    assert same(blockwise_fp8_matmul(a, sa, b, sb))  # the reference says so too
    out = torch.zeros(1, 1, dtype=torch.bfloat16)
    gemm_fp8.gemm_fp8_nt(a, sa, b, sb, out)
    assert same(out)
    masked = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    gemm_fp8.m_grouped_masked(a[None], sa[None], b[None], sb[None], masked, torch.tensor([1], dtype=torch.int32), expected_m=1)
    assert same(masked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 384), (130, 256)])
def test_casts_are_bitwise_the_reference(dtype, shape):
    generator = torch.Generator().manual_seed(5)
    scale = torch.exp(torch.randn(shape[0], 1, generator=generator) * 4)
    x = (torch.randn(*shape, generator=generator) * scale).to(dtype)
    for cast, reference in ((fp8_cast.per_token_cast, per_token_cast_reference), (fp8_cast.per_block_cast, per_block_cast_reference)):
        values, scales = cast(x)
        want_values, want_scales = reference(x)
        assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
        assert torch.equal(scales, want_scales)


def test_per_block_cast_of_a_transposed_view_with_ragged_edges():
    x = torch.randn(200, 130, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).t()
    values, scales = fp8_cast.per_block_cast(x)
    want_values, want_scales = per_block_cast_reference(x)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8)) and torch.equal(scales, want_scales)


@pytest.mark.parametrize("tokens, experts, ranks", [(500, 64, 32), (7, 16, 16), (40, 8, 2)])
def test_dispatch_layout_is_exactly_the_reference(tokens, experts, ranks):
    generator = torch.Generator().manual_seed(7)
    topk_idx = torch.randint(-1, experts, (tokens, 6), generator=generator)  # repeats and -1 included
    got = ep_layout.dispatch_layout(topk_idx, experts, ranks)
    want = dispatch_layout_reference(topk_idx, experts, ranks)
    for have, expected in zip(got, want):
        assert (have is None) == (expected is None)
        if expected is not None:
            assert have.dtype == expected.dtype and torch.equal(have, expected)
