"""torch CPU backend plugin: DeepGEMM's FP8 GEMMs (dense, MoE contiguous, MoE masked) on CPU tensors.

A partial backend: it implements the three FP8 GEMM hooks and the EP combine reduction (hal.backends.cpu.ep), at contract version 2 (float32
outputs and per-token RHS scales included). Selection is per operator: every other operator falls
through to the next backend that implements it, as for any backend that lacks a hook.

Its priority (40) sits between opencl (50) and reference (0): it replaces the reference as the
automatic choice for these GEMMs wherever opencl is not available (1.3-1.8x faster, same numerics),
and yields to opencl where PoCL runs: measured on a 2-core AVX-512 host, opencl is as fast at
m = 1024, 1.2-1.3x faster at m = 256 and in the grouped GEMMs, and 1.7x faster at decode sizes
(m <= 16), where decoding the fp8 weights with torch calls costs more than opencl's whole fused
kernel (README, "Which backend runs CPU tensors"). The order is this one constant.

It needs nothing beyond torch, so it is always available and has no canary: its kernels are
torch's own CPU kernels, the ones the reference runs on.
"""

from __future__ import annotations

import torch

from hal.ops.gemm import GEMM_FP8_NT, M_GROUPED_CONTIGUOUS, M_GROUPED_MASKED
from hal.plugin import Availability, BackendInfo, hookimpl

PRIORITY = 40


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(
        description="torch CPU kernels (MKL sgemm): FP8 GEMMs as exact fp32 per-128-K-block products",
        priority=PRIORITY,
        device_types=("cpu",),
        contract_versions={op.name: op.version for op in (GEMM_FP8_NT, M_GROUPED_CONTIGUOUS, M_GROUPED_MASKED)},
    )


@hookimpl
def hal_backend_availability() -> Availability:
    return Availability(True, device=f"torch {torch.__version__} CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    from hal.backends.cpu.gemm_fp8 import gemm_fp8_nt

    gemm_fp8_nt(a, a_scales, b, b_scales, out)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    from hal.backends.cpu.gemm_fp8 import m_grouped_contiguous

    m_grouped_contiguous(a, a_scales, b, b_scales, out, m_indices)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    from hal.backends.cpu.gemm_fp8 import m_grouped_masked

    m_grouped_masked(a, a_scales, b, b_scales, out, masked_m)


@hookimpl
def hal_ep_combine_reduce(rows, src_idx, num_tokens, weights):
    from hal.backends.cpu.ep import combine_reduce

    return combine_reduce(rows, src_idx, num_tokens, weights)
