"""The FP8 GEMMs on the native kernels (:mod:`hal.backends.cpu.native`): ctypes calls on the operands' memory.

Operands arrive as the ops layer hands them to every backend (see :mod:`hal.backends.cpu.gemm_fp8`):
A and B float8_e4m3fn with K contiguous and a multiple of 128, ``out`` bfloat16 or float32 with
contiguous rows (a row slice of a larger tensor is fine). Scales are passed as contiguous float32
copies when they are not already (DeepGEMM's column-major ``a_scales`` are); nothing the caller
owns is kept or freed. The library splits the work over ``torch.get_num_threads()`` threads and
bounds its own scratch memory whatever the shapes.
"""

from __future__ import annotations

import ctypes

import torch

from hal.backends.cpu import gemm_fp8
from hal.backends.cpu.gemm_fp8 import _group_runs

__all__ = ["gemm_fp8_nt", "m_grouped_contiguous", "m_grouped_masked", "PORTABLE_MAX_ROWS"]

# The portable C path (a CPU or compiler without AVX-512 BF16 + VBMI) multiplies in fp32: measured on
# the 2-core EPYC with AVX-512 BF16 masked off, 2x faster than the torch kernels at m = 1, 1.1x
# at m = 16 and 2x slower at m = 256 (n = 7168, k = 2048), so above this many rows the torch
# kernels run instead.
PORTABLE_MAX_ROWS = 32


def _portable(lib: ctypes.CDLL) -> bool:
    known = getattr(lib, "_hal_portable", None)
    if known is None:
        known = lib._hal_portable = lib.hal_fp8_path() != b"avx512_bf16"
    return known


def _float32_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float32 tensor; itself when it is one (checked first: the conversion
    calls cost a microsecond each even when they return ``x``)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def _blockwise(lib: ctypes.CDLL, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return
    if m > PORTABLE_MAX_ROWS and _portable(lib):
        return gemm_fp8._blockwise(a, a_scales, b, b_scales, out)
    if a.stride(1) != 1 or b.stride(1) != 1 or out.stride(1) != 1 or out.dtype not in (torch.bfloat16, torch.float32) or k % 128:
        raise ValueError(f"native fp8 GEMM: unexpected operands (a strides {a.stride()}, b strides {b.stride()}, out {out.dtype} strides {out.stride()}, K={k})")
    sa = _float32_contiguous(a_scales)
    sb = _float32_contiguous(b_scales)
    per_token = sb.shape[0] == n  # [N, K/128] per token, else [ceil(N/128), K/128] (they agree at N = 1)
    rc = lib.hal_fp8_gemm(
        a.data_ptr(), a.stride(0), sa.data_ptr(), b.data_ptr(), b.stride(0), sb.data_ptr(), int(per_token),
        out.data_ptr(), out.stride(0), int(out.dtype == torch.float32), m, n, k, torch.get_num_threads(),
    )
    if rc:
        raise MemoryError(f"native fp8 GEMM [{m}, {n}, {k}]: out of memory for its scratch buffers (error {rc})")


def gemm_fp8_nt(lib: ctypes.CDLL, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: ``out`` [M, N] = (a * a_scales) @ (b * b_scales).T, written in place."""
    _blockwise(lib, a, a_scales, b, b_scales, out)


def m_grouped_contiguous(
    lib: ctypes.CDLL, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor
) -> None:
    """MoE contiguous: rows of group g use b[g]; -1 rows untouched (one call per run of rows)."""
    for group, start, end in _group_runs(m_indices):
        _blockwise(lib, a[start:end], a_scales[start:end], b[group], b_scales[group], out[start:end])


def m_grouped_masked(
    lib: ctypes.CDLL, a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, out: torch.Tensor, masked_m: torch.Tensor
) -> None:
    """MoE masked: the first masked_m[g] rows of each group, the others untouched."""
    for group, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            _blockwise(lib, a[group, :rows], a_scales[group, :rows], b[group], b_scales[group], out[group, :rows])
