"""OpenCL backend plugin: every operator as OpenCL C kernels through pyopencl (PoCL on CPUs).

Tensors are torch CPU tensors in and out; the kernels run on the device chosen by
:mod:`hal.backends.opencl.device` (``HAL_OPENCL_DEVICE``). The kernel modules import pyopencl,
so they are imported inside the hooks: without pyopencl this module still loads and the
backend reports itself unavailable with the reason, instead of failing discovery.
"""

from __future__ import annotations

import importlib.util

from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(description="any OpenCL 1.2 device through pyopencl (PoCL on CPUs)", priority=50, device_types=("cpu",))


@hookimpl
def hal_backend_availability() -> Availability:
    if importlib.util.find_spec("pyopencl") is None:
        return Availability(False, "pyopencl not installed: pip install 'unihal[opencl]'")
    try:
        from hal.backends.opencl.device import runtime
        from hal.backends.opencl.errors import OpenCLError

        return Availability(True, device=runtime().name)
    except OpenCLError as exc:
        return Availability(False, str(exc))
    except Exception as exc:  # a broken driver or ICD must mark the backend unavailable, never break discovery
        return Availability(False, f"OpenCL could not be initialised: {type(exc).__name__}: {exc}")


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    from hal.backends.opencl.mla_decode import mla_decode

    return mla_decode(q, k_cache, block_table, cache_seqlens, softmax_scale, causal)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    from hal.backends.opencl.gemm_fp8 import gemm_fp8_nt

    gemm_fp8_nt(a, a_scales, b, b_scales, out)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    from hal.backends.opencl.gemm_fp8 import m_grouped_contiguous

    m_grouped_contiguous(a, a_scales, b, b_scales, out, m_indices)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    from hal.backends.opencl.gemm_fp8 import m_grouped_masked

    m_grouped_masked(a, a_scales, b, b_scales, out, masked_m, expected_m)


@hookimpl
def hal_per_token_cast_to_fp8(x):
    from hal.backends.opencl.fp8_cast import per_token_cast

    return per_token_cast(x)


@hookimpl
def hal_per_block_cast_to_fp8(x):
    from hal.backends.opencl.fp8_cast import per_block_cast

    return per_block_cast(x)


@hookimpl
def hal_ep_dispatch_layout(topk_idx, num_experts, num_ranks):
    from hal.backends.opencl.ep_layout import dispatch_layout

    return dispatch_layout(topk_idx, num_experts, num_ranks)
