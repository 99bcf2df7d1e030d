"""DeepGEMM's current API through hal.compat.deep_gemm, shaped like its own tests
(tests/test_fp8_fp4.py, test_bf16.py, test_layout.py), at CPU-sized shapes."""

from __future__ import annotations

import math
import random

import pytest
import torch

import hal
from hal.compat import deep_gemm as dg
from hal.errors import ArgumentError, DTypeError, OperatorNotSupportedError, ShapeError, ValueRangeError


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _cast_k_major(x, per_token, ue8m0):
    return dg.per_token_cast_to_fp8(x, use_ue8m0=ue8m0) if per_token else dg.per_block_cast_to_fp8(x, use_ue8m0=ue8m0)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("accumulate,out_dtype,wgrad", [(False, torch.bfloat16, False), (True, torch.float32, True), (False, torch.float32, False)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_gemm_normal(layout, accumulate, out_dtype, wgrad, ue8m0):
    torch.manual_seed(0)
    m, n, k = 48, 192, 576
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    c = (torch.randn(m, n) * 32).to(out_dtype) if accumulate else None
    d = c.clone() if accumulate else torch.empty(m, n, dtype=out_dtype)
    ref = (a.float() @ b.float().t() + (c.float() if accumulate else 0)).to(out_dtype)
    qa = _cast_k_major(a, True, ue8m0)
    qb = _cast_k_major(b, wgrad, ue8m0)
    if layout[0] == "t":
        qa = (qa[0].T.contiguous(), qa[1].T)
    if layout[1] == "n":
        qb = (qb[0].T.contiguous(), qb[1].T)
    getattr(dg, f"fp8_gemm_{layout}")(qa, qb, d, c=d if accumulate else None, recipe=(1, 1, 128) if wgrad else None,
                                      disable_ue8m0_cast=not ue8m0)
    assert calc_diff(d, ref) < 0.001


def test_mn_major_operands_and_packed_ue8m0_scales():
    torch.manual_seed(1)
    m, n, k = 64, 128, 512
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    qa = dg.per_token_cast_to_fp8(a, use_ue8m0=True, use_packed_ue8m0=True)
    qb = dg.per_token_cast_to_fp8(b, use_ue8m0=True, use_packed_ue8m0=True)
    assert qa[1].dtype == torch.int32 and qa[1].shape == (m, 1)
    assert torch.equal(dg.unpack_ue8m0_from_int(qa[1])[:, :4], dg.per_token_cast_to_fp8(a, use_ue8m0=True)[1])
    d = torch.empty(m, n, dtype=torch.bfloat16)
    # MN-major views of the values, as DeepGEMM's test hands them (x.T.contiguous().T)
    dg.fp8_gemm_nt((qa[0].T.contiguous().T, qa[1]), (qb[0].T.contiguous().T, qb[1]), d, recipe=(1, 1, 128))
    assert calc_diff(d, (a.float() @ b.float().t()).bfloat16()) < 0.001


def test_one_operator_two_spellings():
    torch.manual_seed(2)
    qa = hal.per_token_cast_to_fp8(torch.randn(16, 256))
    qb = hal.per_block_cast_to_fp8(torch.randn(128, 256))
    v1, v2 = torch.empty(16, 128, dtype=torch.bfloat16), torch.empty(16, 128, dtype=torch.bfloat16)
    dg.gemm_fp8_fp8_bf16_nt(qa, qb, v1)
    dg.fp8_gemm_nt(qa, qb, v2)
    assert torch.equal(v1, v2)


def _contiguous_layout(num_groups, expected_m, k, psum, alignment=128):
    random.seed(num_groups)
    actual = [int(expected_m * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    aligned = [dg.align(x, alignment) for x in actual]
    m = sum(aligned)
    a = torch.randn(m, k, dtype=torch.bfloat16)
    layout = torch.empty(num_groups if psum else m, dtype=torch.int32)
    start = 0
    for i, (x, y) in enumerate(zip(actual, aligned)):
        if psum:
            layout[i] = start + x
        else:
            layout[start : start + x] = i
            layout[start + x : start + y] = -1
        a[start + x : start + y] = 0
        start += y
    return m, a, layout


def _whole_output_reference(a, b, layout, psum, alignment=128):
    """As DeepGEMM's generator builds it: each group's aligned segment of rows, padding (A zero)
    included, times its B; DeepGEMM's test compares the whole output with it."""
    ref = torch.full((a.shape[0], b.shape[1]), math.nan)
    ends = layout.tolist() if psum else None
    start = 0
    for g in range(b.shape[0]):
        end = ends[g] if psum else start + int((layout == g).sum())
        aligned = dg.align(end, alignment)
        ref[start:aligned] = a[start:aligned].float() @ b[g].float().t()
        start = aligned
    return ref, [(ends[g], dg.align(ends[g], alignment)) for g in range(b.shape[0])] if psum else []


@pytest.mark.parametrize("psum", [False, True])
def test_m_grouped_fp8_contiguous(psum):
    torch.manual_seed(3)
    groups, n, k = 3, 128, 256
    m, a, layout = _contiguous_layout(groups, 70, k, psum)
    b = torch.randn(groups, n, k, dtype=torch.bfloat16)
    qa = dg.per_token_cast_to_fp8(a, use_ue8m0=False)
    parts = [dg.per_block_cast_to_fp8(b[g], use_ue8m0=False) for g in range(groups)]
    qb = (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    d = torch.full((m, n), math.nan, dtype=torch.bfloat16)  # torch.empty's garbage, made visible
    dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, layout, use_psum_layout=psum)
    # DeepGEMM computes whole tiles: its test checks the whole output, padding rows (A zero) too,
    # and with the psum layout (ensure_zero_padding, the default) that they are exactly zero.
    ref, padding = _whole_output_reference(a, b, layout, psum)
    assert calc_diff(d, ref) < 0.001
    for end, aligned in padding:
        assert torch.equal(d[end:aligned], torch.zeros_like(d[end:aligned]))


def test_m_grouped_masked_and_its_alias():
    torch.manual_seed(4)
    groups, m_max, n, k = 4, 32, 128, 256
    a = torch.randn(groups, m_max, k, dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, dtype=torch.bfloat16)
    masked = torch.tensor([32, 7, 0, 20], dtype=torch.int32)
    qa = [dg.per_token_cast_to_fp8(a[g], use_ue8m0=False) for g in range(groups)]
    qb = [dg.per_block_cast_to_fp8(b[g], use_ue8m0=False) for g in range(groups)]
    lhs = (torch.stack([q[0] for q in qa]), torch.stack([q[1] for q in qa]))
    rhs = (torch.stack([q[0] for q in qb]), torch.stack([q[1] for q in qb]))
    for fn in (dg.m_grouped_fp8_gemm_nt_masked, dg.fp8_m_grouped_gemm_nt_masked):
        d = torch.zeros(groups, m_max, n, dtype=torch.bfloat16)
        fn(lhs, rhs, d, masked, 16)
        for g in range(groups):
            rows = int(masked[g])
            if rows:
                assert calc_diff(d[g, :rows], a[g, :rows].float() @ b[g].float().t()) < 0.001
            assert (d[g, rows:] == 0).all()


def _k_grouped_cast(x, ks):
    """Per group, one scale per 128 rows of each column (DeepGEMM's per-channel cast), compact rows."""
    values, scales, start = torch.zeros(x.shape, dtype=torch.float8_e4m3fn), [], 0
    for k in ks:
        if k:
            chunk = torch.zeros(dg.align(k, 128), x.shape[1], dtype=x.dtype)
            chunk[:k] = x[start : start + k]
            v, s = dg.per_channel_cast_to_fp8(chunk, use_ue8m0=False)
            values[start : start + k] = v[:k]
            scales.append(s)
        start += k
    return values, torch.cat(scales)


def test_k_grouped_fp8_tn_and_nt():
    torch.manual_seed(5)
    m, n, ks = 64, 96, [256, 0, 128, 384]
    total = sum(ks)
    a, b = torch.randn(total, m, dtype=torch.bfloat16), torch.randn(total, n, dtype=torch.bfloat16)
    c = torch.randn(len(ks), m, n) * 32
    ref, start = torch.empty_like(c), 0
    for g, k in enumerate(ks):
        ref[g] = c[g] + a[start : start + k].float().T @ b[start : start + k].float()
        start += k
    qa, qb = _k_grouped_cast(a, ks), _k_grouped_cast(b, ks)
    layout = torch.tensor(ks, dtype=torch.int32)
    d = c.clone()
    dg.k_grouped_fp8_gemm_tn_contiguous(qa, qb, d, ks, layout, d)
    assert calc_diff(d, ref) < 0.001
    # The SM90 form: each group's [M, k] / [N, k] block K-major, flattened in turn; scales [M, sum k/128]
    flat_a = torch.cat([qa[0][s : s + k].T.contiguous().flatten() for s, k in zip([0, 256, 256, 384], ks)])
    flat_b = torch.cat([qb[0][s : s + k].T.contiguous().flatten() for s, k in zip([0, 256, 256, 384], ks)])
    d = c.clone()
    dg.k_grouped_fp8_gemm_nt_contiguous((flat_a, qa[1].T), (flat_b, qb[1].T), d, ks, layout, d)
    assert calc_diff(d, ref) < 0.001


def test_k_grouped_layout_on_the_device_must_match_ks_cpu():
    ks = [128, 256]
    a, b = torch.randn(384, 16, dtype=torch.bfloat16), torch.randn(384, 8, dtype=torch.bfloat16)
    d = torch.zeros(2, 16, 8)
    with pytest.raises(hal.ValueRangeError, match=r"grouped_layout.*256 for group 1.*got 128"):
        dg.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor([128, 128], dtype=torch.int32), d)
    dg.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32), d)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
def test_bf16_gemm(layout):
    torch.manual_seed(6)
    m, n, k = 33, 160, 300
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    c = torch.randn(m, n) * 32
    for out_dtype, accumulate in ((torch.bfloat16, False), (torch.float32, True)):
        d = c.clone().to(out_dtype) if accumulate else torch.empty(m, n, dtype=out_dtype)
        ref = (a.float() @ b.float().t() + (d.float() if accumulate else 0)).to(out_dtype)
        x = a.T.contiguous() if layout[0] == "t" else a
        y = b.T.contiguous() if layout[1] == "n" else b
        getattr(dg, f"bf16_gemm_{layout}")(x, y, d, c=d if accumulate else None)
        assert calc_diff(d, ref) < 1e-5


@pytest.mark.parametrize("psum", [False, True])
def test_bf16_grouped_and_k_grouped(psum):
    torch.manual_seed(7)
    groups, n, k = 3, 128, 256
    m, a, layout = _contiguous_layout(groups, 50, k, psum)
    b = torch.randn(groups, n, k, dtype=torch.bfloat16)
    d = torch.full((m, n), math.nan, dtype=torch.bfloat16)
    dg.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout, use_psum_layout=psum)
    ref, padding = _whole_output_reference(a, b, layout, psum)
    assert calc_diff(d, ref) < 1e-5
    for end, aligned in padding:
        assert torch.equal(d[end:aligned], torch.zeros_like(d[end:aligned]))
    masked = torch.tensor([10, 0, 32], dtype=torch.int32)
    am = torch.randn(groups, 32, k, dtype=torch.bfloat16)
    dm = torch.zeros(groups, 32, n, dtype=torch.bfloat16)
    dg.bf16_m_grouped_gemm_nt_masked(am, b, dm, masked, 16)
    assert calc_diff(dm[0, :10], am[0, :10].float() @ b[0].float().t()) < 1e-5 and (dm[1] == 0).all()
    ks = [128, 256]
    ka, kb = torch.randn(sum(ks), 64, dtype=torch.bfloat16), torch.randn(sum(ks), 32, dtype=torch.bfloat16)
    c = torch.randn(2, 64, 32)
    out = c.clone()
    dg.k_grouped_bf16_gemm_tn_contiguous(ka, kb, out, ks, torch.tensor(ks, dtype=torch.int32), out)
    assert calc_diff(out[1], c[1] + ka[128:].float().T @ kb[128:].float()) < 1e-5


def _packed_by_bytes(sf: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's packed layout from its definition: exponent bytes, zero padding, MN-major ints."""
    groups, mn, columns = (sf if sf.dim() == 3 else sf.unsqueeze(0)).shape
    aligned_mn, padded_k = dg.align(mn, 4), dg.align(columns, 4)
    out = torch.empty(groups, mn, padded_k // 4, dtype=torch.int32)
    exponents = ((sf if sf.dim() == 3 else sf.unsqueeze(0)).contiguous().view(torch.int32) >> 23) & 0xFF
    for g in range(groups):
        for r in range(mn):
            for w in range(padded_k // 4):
                word = 0
                for byte in range(4):
                    c = 4 * w + byte
                    word |= (int(exponents[g, r, c]) if c < columns else 0) << (8 * byte)
                out[g, r, w] = word - (1 << 32) if word >= 1 << 31 else word
    return out if sf.dim() == 3 else out.squeeze(0), aligned_mn


def test_layout_helpers():
    sf = torch.rand(4097, 7) + 0.5
    aligned = dg.get_mn_major_tma_aligned_tensor(sf)
    assert torch.equal(aligned, sf) and aligned.stride(0) == 1 and aligned.stride(1) == dg.get_tma_aligned_size(4097, 4)
    ue = dg.ceil_to_ue8m0(sf)
    assert ((ue.view(torch.int32) & 0x7FFFFF) == 0).all() and (ue >= sf).all() and (ue < 2 * sf).all()
    packed = dg.get_mn_major_tma_aligned_packed_ue8m0_tensor(ue)
    assert packed.dtype == torch.int32 and packed.shape == (4097, 2) and packed.stride() == (1, dg.get_tma_aligned_size(4097, 4))
    assert torch.equal(dg.unpack_ue8m0_from_int(packed)[:, :7], ue)
    assert torch.equal(dg.transform_sf_into_required_layout(packed, 4097, 7 * 128, (1, 1, 128), is_sfa=True), ue)
    dg.set_mk_alignment_for_contiguous_layout(64)
    try:
        assert dg.get_mk_alignment_for_contiguous_layout() == dg.get_m_alignment_for_contiguous_layout() == 64
    finally:
        dg.set_mk_alignment_for_contiguous_layout(128)


@pytest.mark.parametrize("groups,mn,columns", [(1, 65, 1), (2, 65, 1), (1, 64, 7), (2, 68, 3), (3, 5, 9)])
def test_scale_layouts_match_deep_gemm_bytes_and_strides(groups, mn, columns):
    # DeepGEMM's test compares values, shapes and every stride; the single-column case too.
    sf = dg.ceil_to_ue8m0(torch.rand(groups, mn, columns) + 0.01)
    sf = sf.squeeze(0) if groups == 1 else sf
    aligned_mn = dg.get_tma_aligned_size(mn, 4)
    moved = dg.get_mn_major_tma_aligned_tensor(sf)
    assert torch.equal(moved, sf) and moved.stride()[-2:] == (1, aligned_mn)
    if groups > 1:
        assert moved.stride(0) == aligned_mn * columns
    packed = dg.get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)
    want, _ = _packed_by_bytes(sf)
    assert torch.equal(packed, want)  # padding bytes are 0
    assert packed.stride()[-2:] == (1, aligned_mn)
    if groups > 1:
        assert packed.stride(0) == aligned_mn * -(-columns // 4)


def test_packed_scales_skip_the_psum_layouts_gap_rows():
    ue = dg.ceil_to_ue8m0(torch.rand(256, 5) + 0.01)
    ue[100:128] = float("nan")  # rows between group 0's end (100) and group 1's aligned start (128) are never read
    packed = dg.get_mn_major_tma_aligned_packed_ue8m0_tensor(ue, psum_layout=torch.tensor([100, 200], dtype=torch.int32))
    assert (packed[100:128] == 0).all() and (packed[200:] == 0).all()
    assert torch.equal(packed[:100], dg.get_mn_major_tma_aligned_packed_ue8m0_tensor(ue[:100]))


@pytest.mark.parametrize("gran_k", [32, 128])
def test_k_grouped_packed_scales_pack_each_group_on_its_own(gran_k):
    """DeepGEMM's k-grouped layout: each group's K scale rows packed four per int32 (as the MN-major
    packer packs that group alone), groups one after another; psum ends with real (unaligned) K."""
    g = torch.Generator().manual_seed(5)
    mn, ks = 8, [gran_k * 3, gran_k * 8, 0, gran_k]
    sf = dg.ceil_to_ue8m0(torch.rand(sum(ks) // gran_k, mn, generator=g) + 0.01)
    packed = dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(sf, torch.tensor(ks, dtype=torch.int32), ks, gran_k, gran_k)
    want, start = [], 0
    for k in ks:
        rows = k // gran_k
        want.append(_packed_by_bytes(sf[start:start + rows].T.contiguous())[0].T)
        start += rows
    assert packed.dtype == torch.int32 and packed.is_contiguous() and torch.equal(packed, torch.cat(want))
    # psum layout: real K (half a block more in odd groups), group g starting at align(end_{g-1}, k_alignment)
    real = [k + (gran_k // 2 if i % 2 else 0) for i, k in enumerate(ks)]
    ends, end = [], 0
    for k in real:
        end = -(-end // 160) * 160 + k
        ends.append(end)
    rows = [-(-k // gran_k) for k in real]
    sf = dg.ceil_to_ue8m0(torch.rand(sum(rows), mn, generator=g) + 0.01)
    want, start = [], 0
    for r in rows:
        want.append(_packed_by_bytes(sf[start:start + r].T.contiguous())[0].T)
        start += r
    want = torch.cat(want)
    layout = torch.tensor(ends, dtype=torch.int32)
    assert torch.equal(dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(sf, layout, real, gran_k, 160, use_psum_layout=True), want)
    for ks_cpu in (None, [], [-(-k // 160) * 160 for k in real]):  # upper bounds: the groups' rows come first
        bound = dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(sf, layout, ks_cpu, gran_k, 160, use_psum_layout=True)
        assert bound.shape[0] >= want.shape[0] and torch.equal(bound[: want.shape[0]], want) and (bound[want.shape[0]:] == 0).all()
    with pytest.raises(ShapeError):  # more scale rows than the groups own
        dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(sf[:-1], layout, real, gran_k, 160, use_psum_layout=True)
    with pytest.raises(ArgumentError):
        dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(sf, layout, None, gran_k, 160)
    good = (torch.ones(1, 4), torch.tensor([gran_k], dtype=torch.int32), [gran_k], gran_k, gran_k)
    for odd in (torch.ones(2, 2).to_sparse(), torch.tensor(1.0), 5, None, torch.ones(4, 4, dtype=torch.float64), [1.0], "x"):
        for position in range(5):  # each argument replaced by something odd: a typed error naming it, never a raw one
            args = list(good)
            args[position] = odd
            if position == 2 and odd is None:
                continue  # ks_cpu=None is valid with the psum layout; here it raises ArgumentError (checked above)
            with pytest.raises(hal.errors.HalError):
                dg.get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(*args)


def test_fp4_helpers_round_pack_and_transpose_as_deep_gemm():
    """e2m1 codes by nearest value with ties down (argmin over the 8 magnitudes takes the first),
    above 6 -> 6, NaN -> 0, no -0; two codes per byte, even element low; scales amax / 6."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 96, generator=g) * 3
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2, -0.25, -0.3, 7.0, -7.0, 0.5, 0.0, -0.0, 6.0])
    x[5, 70] = float("nan")  # its group's scale is NaN (amax propagates it), so are its values back
    x[1] = x[1].clamp(-5.5, 5.5)
    x[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 6.0, 0.24, 0.26, -2.5, -3.5, 4.99])  # scale 1: exact ties
    x[0, 16:32] = 0.0
    x[0, 20] = 6.0  # amax of the first 32 columns stays 7 (above): scale 7 / 6
    table = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), dtype=torch.float64)  # e2m1 magnitudes of codes 0..7

    def nibbles(packed: torch.Tensor) -> torch.Tensor:  # int8 [m, j] -> codes [m, 2j], even element from the low nibble
        bytes_ = packed.view(torch.uint8)
        return torch.stack((bytes_ & 0xF, bytes_ >> 4), dim=2).view(packed.shape[0], -1)

    for use_ue8m0, gran_k in ((False, 32), (True, 32), (True, 128), (False, 128)):
        packed, sf = dg.per_token_cast_to_fp4(x, use_ue8m0=use_ue8m0, gran_k=gran_k)
        groups = -(-96 // gran_k)
        padded = torch.zeros(6, groups * gran_k, dtype=torch.float64)
        padded[:, :96] = x.double()
        amax = padded.view(6, groups, gran_k).abs().amax(dim=2).clamp(min=1e-4)
        want_sf = (amax.float() / 6.0)
        want_sf = dg.ceil_to_ue8m0(want_sf) if use_ue8m0 else want_sf
        torch.testing.assert_close(sf, want_sf, rtol=0, atol=0, equal_nan=True)
        scaled = (x.float() * (1.0 / want_sf).repeat_interleave(gran_k, dim=1)[:, :96]).double()
        magnitude = torch.nan_to_num(scaled.abs(), nan=0.0)
        code = (magnitude.unsqueeze(-1) - table).abs().argmin(dim=-1)
        code = code | (((scaled < 0) & (code != 0)).long() << 3)
        assert torch.equal(nibbles(packed).long(), code)
        back = dg.cast_back_from_fp4(packed, sf, gran_k)
        value = table[code & 7] * torch.where((code & 8) != 0, -1.0, 1.0).double()
        torch.testing.assert_close(back, value.float() * want_sf.repeat_interleave(gran_k, dim=1)[:, :96], rtol=0, atol=0, equal_nan=True)
        if use_ue8m0:
            packed2, packed_sf = dg.per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=gran_k, use_packed_ue8m0=True)
            assert torch.equal(packed2, packed) and packed_sf.dtype == torch.int32 and packed_sf.shape == (6, -(-groups // 4))
            torch.testing.assert_close(dg.cast_back_from_fp4(packed2, packed_sf, gran_k, use_packed_ue8m0=True), back, rtol=0, atol=0, equal_nan=True)
    transposed = dg.transpose_packed_fp4(packed)  # [96, 3]: codes of column n, rows paired
    assert transposed.shape == (96, 3) and transposed.dtype == torch.int8 and torch.equal(nibbles(transposed), nibbles(packed).T)
    assert torch.equal(dg.transpose_packed_fp4(transposed), packed)
    with pytest.raises(ShapeError):
        dg.per_token_cast_to_fp4(x[:, :95], use_ue8m0=False)
    with pytest.raises(ShapeError):
        dg.transpose_packed_fp4(packed[:5])


def test_transform_sf_follows_the_recipe():
    k = 512
    sf = dg.ceil_to_ue8m0(torch.rand(64, k // 32) + 0.01)
    packed = dg.get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)
    # gran_k 32: ceil(k / 32) columns come back, not ceil(k / 128)
    assert torch.equal(dg.transform_sf_into_required_layout(packed, 64, k, (1, 32)), sf)
    blocks = torch.rand(3, 4) + 0.1
    assert dg.transform_sf_into_required_layout(blocks, 300, k, (1, 128, 128), is_sfa=False) is blocks  # block scales as given
    per_row = torch.rand(65, 4)
    assert dg.transform_sf_into_required_layout(per_row, 65, k, (1, 128)).stride() == (1, 68)
    with pytest.raises(ValueRangeError, match="is_sfa"):
        dg.transform_sf_into_required_layout(per_row, 65, k, (1, 128, 128))
    with pytest.raises(ValueRangeError, match="is_sfa"):
        dg.transform_sf_into_required_layout(per_row, 65, k, (1, 128), is_sfa=True)
    with pytest.raises(ShapeError):
        dg.transform_sf_into_required_layout(torch.rand(3, 4), 256, k, (1, 128, 128), is_sfa=True)


def test_deep_gemm_submodules_and_test_helpers():
    from hal.compat.deep_gemm.testing import assert_bitwise_equal, calc_diff, count_bytes, get_arch_major
    from hal.compat.deep_gemm.utils import align, per_token_cast_to_fp8
    from hal.compat.deep_gemm.utils.layout import get_mn_major_tma_aligned_tensor
    from hal.compat.deep_gemm.utils.math import ceil_div

    assert align(65, 4) == 68 and ceil_div(7, 4) == 2 and dg.__version__
    assert per_token_cast_to_fp8 is dg.per_token_cast_to_fp8 and get_mn_major_tma_aligned_tensor is dg.get_mn_major_tma_aligned_tensor
    x = torch.randn(8, 16)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12) and calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert count_bytes(x, (x.half(), None)) == 8 * 16 * 6 and get_arch_major() == 9
    y = x.clone()
    y[3, 5] += 1
    with pytest.raises(AssertionError, match=r"\(3, 5\)"):
        assert_bitwise_equal(x, y)
    dg.set_block_size_multiple_of(64)
    dg.set_block_size_multiple_of((64, 128))
    with pytest.raises(ValueError):
        dg.set_block_size_multiple_of((64, 0))
    with pytest.raises(AttributeError, match="SM100"):
        dg.fp8_fp4_mega_moe


def test_contiguous_segments_follow_the_alignment_setting():
    torch.manual_seed(8)
    dg.set_mk_alignment_for_contiguous_layout(64)
    try:
        m, a, layout = _contiguous_layout(3, 40, 128, False, alignment=64)
        b = torch.randn(3, 128, 128, dtype=torch.bfloat16)
        d = torch.zeros(m, 128, dtype=torch.bfloat16)
        dg.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)
        for g in range(3):
            rows = layout == g
            assert calc_diff(d[rows], a[rows].float() @ b[g].float().t()) < 1e-5
    finally:
        dg.set_mk_alignment_for_contiguous_layout(128)


@pytest.mark.parametrize("alignment", [32, 128])
def test_psum_rows_read_on_the_host_are_the_torch_paths(alignment):
    """The psum layout's rows as the host reads them (non-decreasing ends within M: every valid
    layout) are the torch path's, row by row, empty and trailing groups included; other ends (a
    decreasing one, one past M, more groups than the host path reads) take the torch path."""
    from hal.ops import gemm_v2

    rng = random.Random(alignment)
    dg.set_mk_alignment_for_contiguous_layout(alignment)
    try:
        for _ in range(400):
            m = alignment * rng.randint(0, 5)
            ends = sorted(rng.randint(0, m) for _ in range(rng.randint(0, 9)))
            layout = torch.tensor(ends, dtype=torch.int32)
            read = gemm_v2._psum_rows(layout, m)
            assert read is not None and read.dtype == torch.int32
            assert torch.equal(read, gemm_v2._psum_to_indices("op", layout, m, alignment)), (ends, m)
        m = 4 * alignment
        for ends, rows in (([3 * alignment, alignment], m), ([m + 1], m), ([0] * 65, m), ([1, 2], m + 1)):  # the last: M not aligned
            assert gemm_v2._psum_rows(torch.tensor(ends, dtype=torch.int32), rows) is None, (ends, rows)
    finally:
        dg.set_mk_alignment_for_contiguous_layout(128)


def test_grouped_layouts_that_passed_do_not_excuse_different_ones():
    """The contiguous and masked grouped GEMMs remember argument layouts that passed their checks;
    another dtype, shape or recipe still raises, and the group ends / row counts are read every call."""
    torch.manual_seed(9)
    groups, n, k = 2, 128, 256
    m, a, layout = _contiguous_layout(groups, 60, k, True)
    qa = dg.per_token_cast_to_fp8(a, use_ue8m0=False)
    b = torch.randn(groups, n, k, dtype=torch.bfloat16)
    per_token = [dg.per_token_cast_to_fp8(b[g], use_ue8m0=False) for g in range(groups)]
    qb = (torch.stack([p[0] for p in per_token]), torch.stack([p[1] for p in per_token]))
    d = torch.empty(m, n, dtype=torch.bfloat16)
    for _ in range(2):
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, layout, recipe=(1, 1, 128), use_psum_layout=True)
    with pytest.raises(DTypeError, match="grouped_layout"):
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, layout.long(), recipe=(1, 1, 128), use_psum_layout=True)
    with pytest.raises(ValueRangeError, match="recipe_a"):
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, layout, recipe=(1, 1, 128), recipe_a=(1, 64), use_psum_layout=True)
    with pytest.raises(ValueRangeError, match="grouped_layout"):  # contents: every call
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, torch.tensor([60, m + 1], dtype=torch.int32), recipe=(1, 1, 128), use_psum_layout=True)
    with pytest.raises(ValueRangeError, match="non-decreasing"):  # a group ending before the previous one: no layout (it was mapped silently)
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d, torch.tensor([m - 10, 60], dtype=torch.int32), recipe=(1, 1, 128), use_psum_layout=True)
    with pytest.raises(DTypeError, match="'d'"):
        dg.m_grouped_fp8_gemm_nt_contiguous(qa, qb, d.float(), layout, recipe=(1, 1, 128), use_psum_layout=True)

    m_max = 32
    qa = (qa[0][: groups * m_max].view(groups, m_max, k), qa[1][: groups * m_max].view(groups, m_max, -1))
    out = torch.empty(groups, m_max, n, dtype=torch.bfloat16)
    masked_m = torch.tensor([32, 5], dtype=torch.int32)
    for expected_m in (8, 9):
        dg.m_grouped_fp8_gemm_nt_masked(qa, qb, out, masked_m, expected_m, recipe=(1, 1, 128))
    with pytest.raises(ValueRangeError, match="expected_m"):
        dg.m_grouped_fp8_gemm_nt_masked(qa, qb, out, masked_m, 0, recipe=(1, 1, 128))
    with pytest.raises(ValueRangeError, match="masked_m"):  # contents: every call
        dg.m_grouped_fp8_gemm_nt_masked(qa, qb, out, torch.tensor([33, 5], dtype=torch.int32), 8, recipe=(1, 1, 128))
    with pytest.raises(DTypeError, match="masked_m"):
        dg.m_grouped_fp8_gemm_nt_masked(qa, qb, out, masked_m.long(), 8, recipe=(1, 1, 128))
    with pytest.raises(ShapeError, match="b\\[1\\]"):  # per-block recipe with per-token scales
        dg.m_grouped_fp8_gemm_nt_masked(qa, qb, out, masked_m, 8, recipe=(1, 128, 128))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_accumulating_into_d_given_as_c_is_one_rounding_of_the_sum(out_dtype):
    """``c`` given as ``d`` (in place), as a separate tensor, and overlapping ``d`` in part (torch
    refuses to add in place then: a temporary) all give the fp32 product plus c, rounded once."""
    torch.manual_seed(10)
    qa = dg.per_token_cast_to_fp8(torch.randn(16, 256), use_ue8m0=False)
    qb = dg.per_block_cast_to_fp8(torch.randn(128, 256), use_ue8m0=False)
    product = torch.empty(16, 128)
    dg.fp8_gemm_nt(qa, qb, product)
    c = (torch.randn(16, 128) * 8).to(out_dtype)
    expected = (product + c.float()).to(out_dtype)
    in_place = c.clone()
    dg.fp8_gemm_nt(qa, qb, in_place, c=in_place)
    separate = torch.empty_like(c)
    dg.fp8_gemm_nt(qa, qb, separate, c=c)
    assert torch.equal(in_place, expected) and torch.equal(separate, expected)
    storage = torch.empty(17, 128, dtype=out_dtype)
    storage[1:] = c
    dg.fp8_gemm_nt(qa, qb, storage[:16], c=storage[1:])
    assert torch.equal(storage[:16], expected)
    # views of d's memory torch cannot see overlap in (an expanded row, a strided view): d's rows
    # must not be read after they were written
    d = c.clone()
    first = d[:1].expand(16, 128)
    expected_first = (product + first.float()).to(out_dtype)
    dg.fp8_gemm_nt(qa, qb, d, c=first)
    assert torch.equal(d, expected_first)
    base = torch.cat([c, c * 2])
    d = base[:16]
    every_other = base.as_strided((16, 128), (256, 2), 1)  # odd elements of rows 0, 2, 4, ...: over d's rows, not dense
    expected_strided = (product + every_other.float()).to(out_dtype)
    dg.fp8_gemm_nt(qa, qb, d, c=every_other)
    assert torch.equal(d, expected_strided)


def test_typed_errors():
    qa = dg.per_token_cast_to_fp8(torch.randn(8, 256), use_ue8m0=False)
    qb = dg.per_block_cast_to_fp8(torch.randn(128, 256), use_ue8m0=False)
    d = torch.empty(8, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueRangeError, match="recipe"):
        dg.fp8_gemm_nt(qa, qb, d, recipe=(1, 128, 64))
    for name in ("recipe", "recipe_a", "recipe_b"):  # not a tuple at all: typed, not Python's TypeError
        with pytest.raises(ArgumentError, match=name):
            dg.fp8_gemm_nt(qa, qb, d, **{name: 128})
    with pytest.raises(ShapeError, match="b\\[1\\]"):
        dg.fp8_gemm_nt(qa, qb, d, recipe=(1, 1, 128))  # per-token recipe with per-block scales
    with pytest.raises(OperatorNotSupportedError, match="FP4"):
        dg.fp8_fp4_gemm_nt((torch.zeros(8, 128, dtype=torch.int8), qa[1]), qb, d)
    with pytest.raises(DTypeError, match="'c'"):
        dg.fp8_gemm_nt(qa, qb, d, c=torch.zeros(8, 128))
    with pytest.raises(DTypeError, match="'d'"):
        dg.fp8_gemm_nt(qa, qb, torch.empty(8, 128, dtype=torch.float16))
    with pytest.raises(ValueRangeError, match="ks_cpu"):
        dg.k_grouped_fp8_gemm_tn_contiguous((torch.zeros(100, 8).to(torch.float8_e4m3fn), torch.ones(1, 8)), (torch.zeros(100, 8).to(torch.float8_e4m3fn), torch.ones(1, 8)),
                                            torch.zeros(1, 8, 8), [100], torch.tensor([100], dtype=torch.int32), torch.zeros(1, 8, 8))
    with pytest.raises(ArgumentError, match="'c'"):
        dg.k_grouped_bf16_gemm_tn_contiguous(torch.zeros(128, 8, dtype=torch.bfloat16), torch.zeros(128, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8), [128],
                                             torch.tensor([128], dtype=torch.int32))
    with pytest.raises(ValueRangeError, match="grouped_layout"):
        dg.m_grouped_bf16_gemm_nt_contiguous(torch.zeros(128, 128, dtype=torch.bfloat16), torch.zeros(2, 128, 128, dtype=torch.bfloat16),
                                             torch.zeros(128, 128, dtype=torch.bfloat16), torch.tensor([100, 200], dtype=torch.int32), use_psum_layout=True)
    assert not hasattr(dg, "einsum") and hasattr(dg, "fp8_gemm_nt")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_skip_head_mid_writes_each_heads_left_and_right_columns(out_dtype):
    """DeepGEMM's fp8_gemm_nt_skip_head_mid: the packed GEMM's per-head (left | right) columns land
    around a gap of mid columns, which keep what d held."""
    g = torch.Generator().manual_seed(8)
    left, mid, right, heads, m, k = 128, 64, 128, 3, 5, 256
    a = dg.per_token_cast_to_fp8(torch.randn(m, k, generator=g), use_ue8m0=False)
    b = dg.per_block_cast_to_fp8(torch.randn(heads * (left + right), k, generator=g), use_ue8m0=False)
    packed = torch.empty(m, heads * (left + right), dtype=out_dtype)
    dg.fp8_gemm_nt(a, b, packed, disable_ue8m0_cast=True)
    d = torch.full((m, heads * (left + mid + right)), 7.0, dtype=out_dtype)
    dg.fp8_gemm_nt_skip_head_mid(a, b, d, (left, mid, right), disable_ue8m0_cast=True)
    gapped, want = d.view(m, heads, -1), packed.view(m, heads, -1)
    assert torch.equal(gapped[:, :, :left], want[:, :, :left]) and torch.equal(gapped[:, :, left + mid:], want[:, :, left:])
    assert (gapped[:, :, left:left + mid] == 7.0).all()
    with pytest.raises(ShapeError, match="'d'"):
        dg.fp8_gemm_nt_skip_head_mid(a, b, d[:, :-1], (left, mid, right))
    with pytest.raises(ShapeError, match="left \\+ right"):
        dg.fp8_gemm_nt_skip_head_mid(a, b, d, (100, mid, 100))
    with pytest.raises(ValueRangeError, match="head_splits"):
        dg.fp8_gemm_nt_skip_head_mid(a, b, d, (left, mid))
