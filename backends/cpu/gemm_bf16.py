"""DeepGEMM's BF16 GEMMs (dense, MoE contiguous, MoE masked) on CPU tensors: torch's bf16 matmul where it is exact.

The contract (:mod:`hal.ops.gemm_bf16`): ``out = a @ b.T``, products exact in fp32, summed in fp32,
rounded once to ``out``'s dtype. Operands arrive bf16, K-major, contiguous, K padded with zeros to a
multiple of 128; ``out`` bf16 or float32 (grouped: bf16), written in place.

Two formulations:

- **bf16 matmul** (``torch.mm`` on the bf16 operands, bf16 out), on x86-64: oneDNN's kernels,
  AVX-512 BF16 ``vdpbf16ps`` (or AMX ``tdpbf16ps``) where the CPU has them, fp32 widening and fp32
  FMAs where it does not, with fp32 accumulators and one rounding at the end: the contract's
  numerics, at the machine's bf16 matmul rate (4-5x the fp32 matmul on the 2-core Zen 5 host; on
  that host ``vdpbf16ps`` measured as two IEEE fp32 additions, ``(acc + p1) + p0``, in 2M random
  cases). Those instructions treat subnormal inputs as zero and flush subnormal results, so it runs
  only when no nonzero |a| or |b| is below 2^-56, which makes every product and every fp32 partial
  sum a multiple of 2^-126: never subnormal, nothing flushed (the reasoning and the scan are in
  ``native/bf16_range.c``; the scan reads each operand once at memory speed).
- **fp32 matmul** of the widened operands: float32 outputs (a bf16 matmul rounds its output to
  bf16), operands with tiny values, a process without the native library (the scan is native), and
  every CPU but x86-64: Arm's BFDOT/BFMMLA, which torch's bf16 matmul uses there, round each pair
  sum to odd without FEAT_EBF16, which is not the contract's arithmetic.

DeepGEMM's own numbers for these shapes come from tensor cores that keep subnormals; so does the
fp32 path, and the bf16 path never meets one.
"""

from __future__ import annotations

import ctypes
import platform

import torch

from hal.backends.cpu.gemm_fp8 import _group_runs

__all__ = ["gemm_bf16_nt", "m_grouped_contiguous", "m_grouped_masked", "bf16_matmul_is_exact"]


def _has_tiny(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    if x.numel() == 0:
        return False
    x = x if x.is_contiguous() else x.contiguous()
    cols = x.shape[-1]
    return bool(lib.hal_bf16_has_tiny(x.data_ptr(), x.numel() // cols, cols, cols, torch.get_num_threads()))


# Where torch's bf16 matmul is known to sum products in IEEE fp32 (see the module docstring).
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def bf16_matmul_is_exact(lib: ctypes.CDLL | None, *operands: torch.Tensor) -> bool:
    """Whether torch's bf16 matmul computes the contract's sums for these contiguous bf16 operands:
    on x86-64, when the native scan finds no nonzero magnitude below 2^-56 in any of them."""
    return X86_64 and lib is not None and not any(_has_tiny(lib, x) for x in operands)


def _fp32_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype == torch.float32 and out.is_contiguous():
        torch.mm(a.float(), b.float().t(), out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float().t()))


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, exact_in_bf16: bool) -> None:
    """out [M, N] = a [M, K] @ b [N, K].T by the fastest formulation that is exact here."""
    if exact_in_bf16 and out.dtype == torch.bfloat16:
        if out.is_contiguous():
            torch.mm(a, b.t(), out=out)
        else:
            out.copy_(torch.mm(a, b.t()))
    else:
        _fp32_product(a, b, out)


def gemm_bf16_nt(lib: ctypes.CDLL | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """Dense: out [M, N] = a [M, K] @ b [N, K].T, bf16 or float32 out."""
    _product(a, b, out, out.dtype == torch.bfloat16 and bf16_matmul_is_exact(lib, a, b))


def m_grouped_contiguous(lib: ctypes.CDLL | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, m_indices: torch.Tensor) -> None:
    """MoE contiguous: rows of group g use b[g] [N, K]; rows handed as -1 untouched (one product per run of rows)."""
    runs = _group_runs(m_indices)
    exact = bf16_matmul_is_exact(lib, a, b)
    for group, start, end in runs:
        _product(a[start:end], b[group], out[start:end], exact)


def m_grouped_masked(lib: ctypes.CDLL | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, masked_m: torch.Tensor) -> None:
    """MoE masked: a [G, M_max, K]; the first masked_m[g] rows of each group, the others untouched."""
    exact = bf16_matmul_is_exact(lib, a, b)
    for group, rows in enumerate(masked_m.tolist()):
        if rows > 0:
            _product(a[group, :rows], b[group], out[group, :rows], exact)
