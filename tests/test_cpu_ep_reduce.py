"""The cpu backend's combine reduction (``ep_combine_reduce``): the native kernel
(``backends/cpu/native/ep_reduce.c``) and the torch tiling beside it give the reference's value bit
for bit (NaN payloads aside), for whole tensors and for rows in segments (contract version 2),
any row counts per token, weights or none, every dtype, non-finite values and signed zeros.
The native half is skipped where the library cannot be built (no C compiler)."""

from __future__ import annotations

import random

import pytest
import torch

from hal.backends.cpu import native
from hal.backends.cpu.ep import combine_reduce, combine_reduce_native
from hal.ops.ep_local import combine_reduce_reference

_LIB = native.library()


def _identical(got: torch.Tensor, want: torch.Tensor, zero_signs: bool = True) -> bool:
    """Equal bits, except that any NaN matches any NaN (and, without ``zero_signs``, -0.0 matches +0.0)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if not zero_signs:
        got, want = got + 0.0, want + 0.0  # -0.0 + 0.0 is +0.0
    nan = got.isnan()
    if not torch.equal(nan, want.isnan()):
        return False
    words = torch.int32 if got.dtype == torch.float32 else torch.int16
    return torch.equal(got.masked_fill(nan, 0).view(words), want.masked_fill(nan, 0).view(words))


def _problem(rng: random.Random, generator: torch.Generator):
    tokens, width = rng.randint(0, 40), rng.choice([1, 7, 64, 1024, 1500])
    per_token = torch.randint(0, 5, (tokens,), generator=generator)
    src = torch.repeat_interleave(torch.arange(tokens), per_token)
    src = src[torch.randperm(src.numel(), generator=generator)].to(torch.int32)
    rows = torch.randn(src.numel(), width, generator=generator) * rng.choice([1.0, 1e-30, 3e4, 7e4])
    if rows.numel() and rng.random() < 0.4:  # non-finite values and negative zeros
        flat = rows.view(-1)
        flat[torch.randint(0, flat.numel(), (4,), generator=generator)] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    if rows.numel() and rng.random() < 0.2:
        rows = rows.abs() * -0.0  # every row -0.0: the sums are +0.0, as the reference's zeros make them
    rows = rows.to(rng.choice([torch.bfloat16, torch.float16, torch.float32]))
    weights = torch.rand(src.numel(), generator=generator) if rng.random() < 0.5 else None
    cuts = sorted(rng.sample(range(src.numel() + 1), k=min(src.numel() + 1, rng.randint(0, 3))))
    segments = tuple(rows[a:b] for a, b in zip([0, *cuts], [*cuts, src.numel()]))
    return rows, segments, src, tokens, weights


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_reduce_equals_the_reference_for_whole_rows_and_segments(seed: int, kernel: str):
    if kernel == "native" and _LIB is None:
        pytest.skip(f"native kernels unavailable here: {native.describe(1)[1]}")
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(60):
        rows, segments, src, tokens, weights = _problem(rng, generator)
        want = combine_reduce_reference(rows, src, tokens, weights)
        for given in (rows, segments):
            if kernel == "native":
                got = combine_reduce_native(_LIB, given, src, tokens, weights, rng.choice([1, 2]))
            else:
                got = combine_reduce(given, src, tokens, weights)
            # The torch tiling may give -0.0 for a sum of -0.0 rows (documented in hal.backends.cpu.ep).
            assert _identical(got, want, zero_signs=kernel == "native"), (rows.dtype, tokens, weights is not None, len(segments))


@pytest.mark.skipif(_LIB is None, reason="native kernels unavailable here")
def test_native_reduce_reads_strided_segments_and_rounds_fp16_like_torch():
    # Every fp16 sum of two fp16 values, overflow to inf and subnormal results included: the
    # kernel's fp32 -> fp16 rounding is torch's.
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[~halves.isnan()]
    pair = torch.stack([halves, halves.flip(0)]).reshape(2, -1)  # [2, N]: token t sums column t
    wide = torch.zeros(2, pair.shape[1] * 2, dtype=torch.float16)[:, ::2]  # a strided view along the width
    wide.copy_(pair)
    segments = (wide[:1], wide[1:])
    src = torch.tensor([0, 0], dtype=torch.int32)
    got = combine_reduce_native(_LIB, segments, src, 1, None, 1)
    want = combine_reduce_reference(pair, src, 1, None)
    assert _identical(got, want)
