"""The cpu backend's native FP8 GEMM kernels (hal.backends.cpu.native): the reference's numerics
across every kernel and every tile, strip and panel edge (row strips of up to 12 rows from 49 rows
on, 32-column strips, 16-column halves, 64-wide K steps of the packing, 128-wide K blocks), both scale layouts, both outputs,
non-finite values, every e4m3 code; the build cache and its failures; the
fallback to the torch kernels. The portable C path (built without AVX-512 BF16) is held to the same
cases. Skipped where the library cannot be built (no C compiler). The grouped layouts through
hal's API run on these kernels in tests/test_cpu_backend.py, beside the torch kernels."""

from __future__ import annotations

import math
import platform
import threading

import pytest
import torch

import hal
from hal.backends.cpu import gemm_fp8, gemm_native, native, plugin
from hal.conformance.case import judge
from hal.ops.gemm_reference import blockwise_fp8_matmul

FP8 = torch.float8_e4m3fn

_FAST = native.library()
pytestmark = pytest.mark.skipif(_FAST is None, reason=f"native kernels unavailable here: {native.describe(1)[1]}")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The portable C path without OpenMP (so with the library's own pthread pool), built twice at
    once into one fresh folder (the atomic rename)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is forced with an x86 flag (-mno-avx512bf16)")
    folder = tmp_path_factory.mktemp("native")
    flags = tuple(f for f in native.FLAGS if f != "-fopenmp") + ("-mno-avx512bf16",)
    builds = []
    threads = [threading.Thread(target=lambda: builds.append(native.build(flags=flags, folder=folder))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 2 and all(b.path is not None and b.kernels == "portable C" for b in builds), builds
    assert sorted(p.name for p in folder.iterdir()) == sorted([builds[0].path.name, builds[0].path.with_suffix(".json").name])
    lib = native.load(builds[0])
    assert lib.hal_fp8_path() == b"portable C"
    return lib


@pytest.fixture(params=["fast", "portable"])
def lib(request, monkeypatch):
    if request.param == "fast":
        if _FAST.hal_fp8_path() != b"avx512_bf16":
            pytest.skip("this CPU or compiler has no AVX-512 BF16 + VBMI: the default build is the portable path")
        return _FAST
    monkeypatch.setattr(gemm_native, "PORTABLE_MAX_ROWS", 1 << 30)  # every shape on the portable path, none handed to torch
    return request.getfixturevalue("portable")


def _cast(x: torch.Tensor, rows_per_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] as e4m3 with one scale per (rows_per_scale x 128) block, as hal's casts do (done
    here in torch so that no backend is probed: these tests need only the cpu backend)."""
    r, k = x.shape
    blocks = -(-r // rows_per_scale)
    padded = torch.zeros(blocks * rows_per_scale, k)
    padded[:r] = x
    view = padded.view(blocks, rows_per_scale, k // 128, 128)
    scales = view.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    values = (view / scales[:, None, :, None]).view(-1, k)[:r].to(FP8)
    return values.contiguous(), scales.contiguous()


def _lhs(m: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return _cast(torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen)), 1)


def _rhs(n: int, k: int, gen: torch.Generator, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    b, sb = _cast(torch.randn(n, k, generator=gen), 128)
    if per_token:
        sb = torch.rand(n, k // 128, generator=gen) + 0.5
    return b, sb


def _expected(a, sa, b, sb) -> torch.Tensor:
    with hal.use_backend("reference"):
        return blockwise_fp8_matmul(a, sa, b, sb)


def _assert_conforms(got: torch.Tensor, expected: torch.Tensor, op: str = "gemm_fp8_nt") -> None:
    verdicts = judge(op, "out_fp32" if got.dtype == torch.float32 else "out", got, expected)
    assert all(v.passed for v in verdicts), [(v.metric, v.value, v.note) for v in verdicts]


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal value for value, NaN where expected has NaN."""
    nan = torch.isnan(expected)
    return torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], expected[~nan])


# m: 1 (dot products along K), 2, 7 and 6 (lane groups, 2-8 rows at any K); 10, 13, 15, 16 (rows in
# lanes, 9-16 rows, 8-column groups; 1 and 5 K blocks: the decode of the next block and of the
# next group's first block); 17, 33, 40 (16-row passes, the last 1 / 1 / 8 rows by the one-row and
# lane-group kernels); 65 (tiles: six strips, the last of 5 rows; packed per K block); 255, 257
# (many strips in groups: B packed once per strip of columns); 70 at 65 K blocks (with one thread
# B is packed in two chunks of K, see test_tiles_with_b_packed_in_two_chunks_of_k). n: one partial
# half, a partial second half, whole strips plus a 2-column tail. k: 1-3 K blocks.
@pytest.mark.parametrize(
    "m, n, k",
    [(1, 200, 128), (2, 130, 256), (7, 32, 384), (6, 130, 1280), (10, 130, 1280), (13, 33, 256), (15, 200, 256), (16, 130, 384), (16, 61, 128), (15, 333, 640), (17, 200, 128), (33, 48, 256), (40, 70, 384), (65, 130, 256), (255, 130, 256), (257, 200, 384), (70, 40, 65 * 128)],
)
@pytest.mark.parametrize("per_token", [False, True])
def test_dense_matches_the_reference(lib, m, n, k, per_token):
    gen = torch.Generator().manual_seed(m * 1000 + n + k + per_token)
    (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen, per_token)
    expected = _expected(a, sa, b, sb)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((m, n), math.nan, dtype=dtype)
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
        _assert_conforms(out, expected)


def test_every_e4m3_code_and_every_product_is_exact(lib):
    """A [256, 128] and B [256, 128] hold code i in column 0 of row i, zeros elsewhere: out[i, j] is
    the product of codes i and j, exact in fp32 (NaN for 0x7f and 0xff), subnormals included."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    a = torch.zeros(256, 128, dtype=torch.uint8)
    a[:, 0] = codes
    a, b = a.view(FP8), a.clone().view(FP8)
    ones = torch.ones(256, 1)
    values = codes.view(FP8).double()
    exact = (values[:, None] * values[None, :]).float()
    out = torch.empty(256, 256)
    gemm_native.gemm_fp8_nt(lib, a, ones, b, ones, out)
    assert _same(out, exact)
    out16 = torch.empty(256, 256, dtype=torch.bfloat16)
    gemm_native.gemm_fp8_nt(lib, a, ones, b, ones, out16)
    nan, zero = torch.isnan(exact), exact == 0
    rounded = exact.to(torch.bfloat16)
    assert torch.equal(out16.view(torch.int16)[~nan & ~zero], rounded.view(torch.int16)[~nan & ~zero])  # torch's rounding, bit for bit
    assert torch.isnan(out16[nan].float()).all() and (out16[zero] == 0).all()


def test_partial_sums_that_cancel_to_tiny_values_are_not_flushed(lib):
    """Block sums as small as one product of two subnormals (2^-18), after cancellation, scaled up."""
    k = 256
    a = torch.zeros(3, k)
    b = torch.zeros(130, k)
    a[:, :3] = torch.tensor([1.0, -1.0, 2.0**-9])  # exact in any summation order
    b[:, :3] = torch.tensor([1.0, 1.0, 2.0**-9])
    a[1, 128:131] = torch.tensor([2.0**-9, 2.0**-9, -(2.0**-8)])  # sums to 0 exactly in block 1
    b[:, 128:131] = 2.0**-9
    sa, sb = torch.full((3, 2), 2.0**20), torch.ones(2, 2)
    a8, b8 = a.to(FP8), b.to(FP8)
    out = torch.empty(3, 130)
    gemm_native.gemm_fp8_nt(lib, a8, sa, b8, sb, out)
    expected = _expected(a8, sa, b8, sb)
    assert _same(out, expected) and out[0, 0].item() == 2.0**2  # (2^-18 * 2^20) and nothing else


# The decode-batch kernels: 1 row (dot products), 2-8 rows (2, 4 or 8 row slots of lanes, each
# column's accumulators rotating A's rows through them; 3, 5 and 7 rows leave a slot empty).
FEW_ROWS = [(1, 256), (2, 256), (3, 1280), (4, 256), (5, 256), (8, 256), (5, 1280), (7, 1280)]


@pytest.mark.parametrize("m, k", FEW_ROWS)
def test_few_rows_pair_every_position_of_k(lib, m, k):
    """The streaming kernels decode A and B into the same permuted lane order: B's row j is 1.0 at
    K position j only, so out[r, j] must be A's value at (r, j), for every position of the first 256
    (every non-NaN code and two zeros, shuffled differently in each row; a NaN would reach every
    column)."""
    gen = torch.Generator().manual_seed(7 + m)
    codes = torch.stack([torch.randperm(256, generator=gen) for _ in range(m)]).to(torch.uint8)
    codes[(codes == 0x7F) | (codes == 0xFF)] = 0
    a = torch.zeros(m, k, dtype=torch.uint8)
    a[:, :256] = codes
    a = a.view(FP8)
    b = torch.zeros(256, k)
    b[:, :256] = torch.eye(256)
    b = b.to(FP8)
    sa, sb = torch.ones(m, k // 128), torch.ones(2, k // 128)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(m, 256, dtype=dtype)
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
        assert _same(out.float(), a[:, :256].float()), "a K position met the wrong one of B"


# Long K: past 32 KiB of A's rotations (2 KiB per K block at 5-8 rows, 1 at 3-4, 0.5 at 2) the
# lane-group kernel runs each column run K range by K range, a column's sums kept between ranges.
LONG_K = [(8, 37, 5120), (5, 130, 7168), (3, 41, 9216), (2, 67, 16384)]


@pytest.mark.parametrize("m, n, k", LONG_K)
def test_few_rows_at_long_k_match_the_reference(lib, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen)
    expected = _expected(a, sa, b, sb)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((m, n), math.nan, dtype=dtype)
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
        _assert_conforms(out, expected)


@pytest.mark.parametrize("m, n, k", LONG_K)
def test_few_rows_at_long_k_meet_every_k_range(lib, m, n, k):
    """Column j of B is 1.0 at one K position only, spread over every K range and block (its scale
    2^j % 5), so out[r, j] must be A's value there times that scale: a range skipped, counted twice
    or its sums lost between ranges shows."""
    gen = torch.Generator().manual_seed(k + m)
    a = (torch.randn(m, k, generator=gen) * 4).to(FP8)
    positions = torch.randperm(k, generator=gen)[:n]
    b = torch.zeros(n, k)
    b[torch.arange(n), positions] = 1.0
    b = b.to(FP8)
    sa = torch.ones(m, k // 128)
    sb = torch.ones(n, k // 128)
    sb[torch.arange(n), positions // 128] = 2.0 ** (torch.arange(n) % 5).float()
    out = torch.empty(m, n)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)  # sb [N, K/128]: per-token B scales
    assert _same(out, a.float()[:, positions] * 2.0 ** (torch.arange(n) % 5).float())


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 40])
def test_nan_of_any_payload_is_written_as_torchs_bf16_nan(lib, m):
    """A NaN scale whose payload fills the mantissa (0x7fffffff: rounding it as a number carries into
    the sign, -0.0) reaches the bfloat16 output as 0x7fc0, on every kernel's output path; the other
    rows round to nearest even as torch rounds the fp32 result."""
    gen = torch.Generator().manual_seed(m)
    (a, sa), (b, sb) = _lhs(m, 256, gen), _rhs(37, 256, gen)
    sa = sa.clone()
    sa[m // 2, 1] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    out = torch.empty(m, 37, dtype=torch.bfloat16)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
    wide = torch.empty(m, 37)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, wide)
    assert torch.equal(out.view(torch.int16)[m // 2], torch.full((37,), 0x7FC0, dtype=torch.int16))
    others = torch.arange(m) != m // 2
    assert torch.equal(out.view(torch.int16)[others], wide.to(torch.bfloat16).view(torch.int16)[others])


@pytest.mark.parametrize("m, k", FEW_ROWS)
@pytest.mark.parametrize("n", [1, 3, 130, 203])
def test_few_rows_nan_and_infinite_scales_and_a_strided_output(lib, m, k, n):
    """Column tails of 1-3, NaN codes in B, infinite and NaN scales of both operands (per-block and
    per-token B scales), output rows inside wider ones; then a NaN in A's last row."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    for per_token in (False, True):
        (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen, per_token)
        b.view(torch.uint8)[n // 2, 200] = 0xFF
        sa[m - 1, 1] = math.inf
        sa[0, 0] = math.nan if m > 1 else sa[0, 0]
        if n > 2:
            sb[-1, 1] = math.inf
            sb[0, 2 % (k // 128)] = math.nan
        expected = _expected(a, sa, b, sb)
        wide = torch.full((m + 2, n + 7), math.nan)
        got = wide[1:1 + m, 3:3 + n]
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, got)
        _assert_conforms(got, expected)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.equal(torch.isnan(got), torch.isnan(expected))
        rest = torch.ones_like(wide, dtype=torch.bool)
        rest[1:1 + m, 3:3 + n] = False
        assert torch.isnan(wide[rest]).all()
    a.view(torch.uint8)[m - 1, 5] = 0x7F  # NaN in the last row: that row is NaN, the others are not
    out = torch.empty(m, n, dtype=torch.bfloat16)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
    assert torch.isnan(out[m - 1].float()).all()


@pytest.mark.parametrize("m", [16, 20])
def test_nan_codes_infinite_and_nan_scales_and_zero_rows(lib, m):
    gen = torch.Generator().manual_seed(3)
    n, k = 200, 384
    (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen)
    a.view(torch.uint8)[1, 5] = 0x7F  # NaN in A: that row is NaN
    b.view(torch.uint8)[7, 200] = 0xFF  # NaN in B: that column is NaN
    a.view(torch.uint8)[4] = 0  # a zero row: 0, or NaN where a scale is infinite
    a.view(torch.uint8)[5] = 0x80  # a row of -0.0
    sa[4, 2] = math.inf
    sa[6, 1] = math.inf
    sa[8, 0] = math.nan
    sb[1, 0] = -math.inf
    sb[0, 2] = math.nan
    expected = _expected(a, sa, b, sb)
    assert torch.isnan(expected).any() and torch.isinf(expected).any()
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(m, n, dtype=dtype)
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
        _assert_conforms(out, expected)
        assert torch.equal(torch.isinf(out), torch.isinf(expected)) and torch.equal(torch.isnan(out), torch.isnan(expected))


@pytest.mark.parametrize("m", [15, 16])
def test_a_partial_column_group_never_sees_the_columns_before_it(lib, m):
    """The rows-in-lanes kernel decodes 8 columns side by side into a scratch that the next group
    reuses: a last group of 1 column follows 8 columns of NaN (and of +-448) whose decoded values
    are still there. Only the one column's sums may reach out."""
    gen = torch.Generator().manual_seed(5)
    n, k = 8 * 17 + 1, 384
    (a, sa), (b, sb) = _lhs(m, k, gen), _rhs(n, k, gen)
    b.view(torch.uint8)[128:136, ::2] = 0x7F
    b.view(torch.uint8)[128:136, 1::2] = 0x7E
    expected = _expected(a, sa, b, sb)
    assert torch.isfinite(expected[:, 136]).all() and torch.isnan(expected[:, 128:136]).all()
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((m, n), math.nan, dtype=dtype)
        gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
        _assert_conforms(out, expected)


def test_tiles_with_b_packed_in_two_chunks_of_k(lib):
    """65 K blocks: B strips are packed 64 blocks at a time when a work item has more than two row
    strips, which with one thread it does (with more threads the items get thinner: one block at a
    time); the rows are written after the last chunk."""
    gen = torch.Generator().manual_seed(6)
    (a, sa), (b, sb) = _lhs(70, 65 * 128, gen), _rhs(40, 65 * 128, gen)
    expected = _expected(a, sa, b, sb)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for dtype in (torch.bfloat16, torch.float32):
            out = torch.full((70, 40), math.nan, dtype=dtype)
            gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
            _assert_conforms(out, expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m", [16, 17, 65])
def test_row_slice_and_strided_outputs_leave_the_rest_untouched(lib, m):
    gen = torch.Generator().manual_seed(4)
    (a, sa), (b, sb) = _lhs(m, 256, gen), _rhs(70, 256, gen)
    expected = _expected(a, sa, b, sb)
    big = torch.full((m + 14, 70), math.nan, dtype=torch.bfloat16)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, big[6:6 + m])
    _assert_conforms(big[6:6 + m], expected)
    assert torch.isnan(big[:6].float()).all() and torch.isnan(big[6 + m:].float()).all()
    wide = torch.full((m, 100), math.nan)
    gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, wide[:, 10:80])  # rows 100 apart
    _assert_conforms(wide[:, 10:80], expected)
    assert torch.isnan(wide[:, :10]).all() and torch.isnan(wide[:, 80:]).all()


@pytest.mark.parametrize("m", [1, 3, 8, 16, 40])
def test_threads_do_not_change_the_bits(lib, m):
    gen = torch.Generator().manual_seed(5)
    (a, sa), (b, sb) = _lhs(m, 512, gen), _rhs(300, 512, gen)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.empty(m, 300)
            gemm_native.gemm_fp8_nt(lib, a, sa, b, sb, out)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_api_runs_the_native_kernels_and_honours_the_switch(monkeypatch):
    """HAL_CPU_NATIVE=0 sends the same call to the torch kernels (read per call) and says so."""
    gen = torch.Generator().manual_seed(7)
    (a, sa), (b, sb) = _lhs(9, 256, gen), _rhs(130, 256, gen)
    torch_calls = []
    real = gemm_fp8.gemm_fp8_nt
    monkeypatch.setattr(gemm_fp8, "gemm_fp8_nt", lambda *args: (torch_calls.append(1), real(*args)))
    out = torch.empty(9, 130, dtype=torch.bfloat16)
    plugin.hal_gemm_fp8_nt(a, sa, b, sb, out)
    assert not torch_calls
    native_out = out.clone()
    assert plugin.hal_backend_availability().device.startswith("native kernels: fp8 GEMMs, MLA decode, combine reduce (")
    monkeypatch.setenv(native.ENV_NATIVE, "0")
    plugin.hal_gemm_fp8_nt(a, sa, b, sb, out)
    assert torch_calls == [1]
    _assert_conforms(native_out, _expected(a, sa, b, sb))
    assert plugin.hal_backend_availability().device.startswith("torch kernels (HAL_CPU_NATIVE=0)")
    assert plugin.priority() == plugin.PRIORITY and "HAL_CPU_NATIVE=0" in plugin.hal_backend_canary_key()


def test_a_failed_build_is_reported_recorded_and_not_retried(tmp_path, monkeypatch):
    """A compiler that fails: the torch kernels run, the reason carries its last words, the
    failure is recorded so that the next process neither retries nor ranks the backend above opencl."""
    cc = tmp_path / "fakecc"
    count = tmp_path / "count"
    cc.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "gcc (Fake) 9.9.9"; exit 0; fi\n'
        f'case "$*" in *-shared*) echo x >> "{count}";; esac\n'
        'echo "fp8_gemm.c:1: error: this compiler refuses" >&2; exit 1\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    attempts = []
    for _ in range(2):
        built = native.build()
        assert built.path is None and "this compiler refuses" in built.reason and built.compiler == "gcc 9.9.9"
        attempts.append(count.read_text().count("x"))
    assert attempts == [3, 3]  # every flag, then without -fopenmp, then without -march=native too; never again
    assert native.library() is None
    assert not native.expected_fast()
    words = plugin.hal_backend_availability().device
    assert words.startswith("torch kernels (native kernels unavailable: build failed:") and "this compiler refuses" in words


def test_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    assert native.build().path is None and "does not run" in native.build().reason
    assert native.describe(2) == (False, native.describe(2)[1]) and native.describe(2)[1].startswith("torch kernels (native kernels unavailable")


def test_the_build_is_cached_per_machine_and_source():
    built = native.build()
    assert built.path is not None and built.path.parent.name == "cpu-native" and built.path.exists()
    assert native.build() == built  # the cache answers
    key = native.canary_key()
    assert "HAL_CPU_NATIVE=" in key and "sources " in key and "flags " in key and "cpu " in key


def test_the_portable_path_hands_many_rows_to_the_torch_kernels(portable, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    (a, sa), (b, sb) = _lhs(gemm_native.PORTABLE_MAX_ROWS + 1, 256, gen), _rhs(130, 256, gen)
    calls = []
    real = gemm_fp8._blockwise
    monkeypatch.setattr(gemm_fp8, "_blockwise", lambda *args: (calls.append(1), real(*args)))
    out = torch.empty(a.shape[0], 130, dtype=torch.bfloat16)
    gemm_native.gemm_fp8_nt(portable, a, sa, b, sb, out)
    assert calls == [1]
    _assert_conforms(out, _expected(a, sa, b, sb))
    gemm_native.gemm_fp8_nt(portable, a[:-1], sa[:-1], b, sb, out[:-1])
    assert calls == [1]
