"""A deliberately misbehaving backend: the dense GEMM hangs, the masked GEMM kills its process,
the per-token cast raises, the per-block cast prints to stdout. Used to prove the conformance
runner survives all four."""

import os
import time

from hal.ops.ep import dispatch_layout_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="hangs, crashes, raises (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    time.sleep(3600)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    os.abort()


@hookimpl
def hal_per_token_cast_to_fp8(x):
    raise RuntimeError("kernel launch failed: out of registers")


@hookimpl
def hal_ep_dispatch_layout(topk_idx, num_experts, num_ranks):
    return dispatch_layout_reference(topk_idx, num_experts, num_ranks)


@hookimpl
def hal_per_block_cast_to_fp8(x):
    """Correct, but chatty: it prints to stdout, JSON-looking lines included."""
    from hal.ops.fp8_quant import per_block_cast_reference

    print('{"event": "result", "result": "not from the worker"}')
    print("driver: compiling kernels...", flush=True)
    return per_block_cast_reference(x)
