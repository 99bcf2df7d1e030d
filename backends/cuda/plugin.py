"""CUDA backend plugin: every operator through the shared Triton kernels.

Kernel modules are imported on first use, so discovery never imports Triton.
"""

from __future__ import annotations

from hal.backends.cuda.device import detect
from hal.plugin import Availability, BackendInfo, hookimpl

_TARGET = detect()


@hookimpl
def hal_backend_info() -> BackendInfo:
    if _TARGET.simulated:
        # A simulator is never picked automatically: it is slow and proves numerics, not speed.
        return BackendInfo(description="NVIDIA GPUs via Triton, simulated in the Triton CPU interpreter", priority=-1, device_types=("cpu",))
    return BackendInfo(description="NVIDIA GPUs: Triton kernels JIT-compiled per GPU", priority=100, device_types=("cuda",))


@hookimpl
def hal_backend_availability() -> Availability:
    if not _TARGET.available:
        return Availability(False, _TARGET.description)
    return Availability(True, device=_TARGET.description, simulated=_TARGET.simulated)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    from hal.backends.triton.mla_decode import mla_decode

    return mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    from hal.backends.triton.fp8_gemm import DENSE, fp8_gemm

    fp8_gemm(a, a_scales, b, b_scales, out, layout=DENSE)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    from hal.backends.triton.fp8_gemm import CONTIGUOUS, fp8_gemm

    fp8_gemm(a, a_scales, b, b_scales, out, layout=CONTIGUOUS, groups=m_indices)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    from hal.backends.triton.fp8_gemm import MASKED, fp8_gemm

    fp8_gemm(a, a_scales, b, b_scales, out, layout=MASKED, groups=masked_m)


@hookimpl
def hal_per_token_cast_to_fp8(x):
    from hal.backends.triton.fp8_cast import per_token_cast

    return per_token_cast(x)


@hookimpl
def hal_per_block_cast_to_fp8(x):
    from hal.backends.triton.fp8_cast import per_block_cast

    return per_block_cast(x)


@hookimpl
def hal_ep_dispatch_layout(topk_idx, num_experts, num_ranks):
    from hal.backends.triton.ep_layout import dispatch_layout

    return dispatch_layout(topk_idx, num_experts, num_ranks)
