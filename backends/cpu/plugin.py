"""cpu backend plugin: DeepGEMM's FP8 GEMMs (dense, MoE contiguous, MoE masked), BF16 GEMMs (the
same three) and FP8 casts, FlashMLA's dense MLA decode and the EP combine reduction on CPU tensors.

A partial backend: it implements the three FP8 GEMM hooks at contract version 2 (float32 outputs
and per-token RHS scales included), the three BF16 GEMM hooks (:mod:`hal.backends.cpu.gemm_bf16`:
torch's bf16 matmul where a native range scan shows it exact, else the fp32 matmul), the two
FP8 casts and ``quantize_mla_kv_cache`` (:mod:`hal.backends.cpu.casts`, the reference's codes,
scales and records; the reference itself without the native library), ``mla_decode`` (with the
one-part schedule from its own ``get_mla_metadata``: its kernel walks every sequence whole) and
``ep_combine_reduce`` (:mod:`hal.backends.cpu.ep`). Selection is per operator: every other
operator falls through to the next backend that implements it, as for any backend that lacks a hook.

MLA decode runs on the native kernel (:mod:`hal.backends.cpu.mla_native`: ``vdpbf16ps`` scores,
online softmax in fp32, P @ V in fp32) or, without it, on the reference formulation
(:func:`hal.ops.mla_reference.mla_decode_reference`). Measured on the same host at b 16/32, s_k
1024/4096, h_q 16/128, bf16: 2.1-3.8x faster than the fastest torch formulation and 1.9-4x faster
than opencl (README, "Which backend runs CPU tensors").

Two implementations of the GEMMs, with the reference's numerics (per-128-K-block fp32 products,
scales promoted per block, one rounding at the end):

- **native** (:mod:`hal.backends.cpu.native`, the default): a small C library compiled on this
  machine on first use (``cc -O3 -march=native``, cached in ``$HAL_CACHE_DIR/cpu-native``) and
  called through ctypes. With AVX-512 BF16 and VBMI (AMD Zen 4, Intel Sapphire Rapids and later)
  the fp8 weights are decoded once per 32-column strip into bf16 pairs and multiplied with
  ``vdpbf16ps`` (every e4m3 value is exact in bf16, every product of two exact in fp32); elsewhere
  a portable C path (fp32 products) runs up to 32 rows and the torch kernels above.
- **torch** (:mod:`hal.backends.cpu.gemm_fp8`): fp32 per-block ``bmm`` after a table decode. It
  runs when ``HAL_CPU_NATIVE=0``, when no C compiler is found, or when the build fails;
  ``hal backends`` shows which one runs in the device column, and why.

Priority. With the native fast path expected (kernels on, a compiler, a CPU with AVX-512 BF16 and
VBMI, and no failed build recorded on this machine: cheap checks, no build) the priority is 60,
above opencl (50): measured on a 2-core AVX-512 EPYC (Zen 4) host, the native kernels are 6-14x
faster than opencl at decode sizes (m <= 16: 1.2-3.5 ms against 14-27 ms on DeepSeek-V3 shapes)
and 3.3-4x faster at m >= 256, dense and grouped, where they run at 95-98% of the machine's bf16
``matmul`` rate (README, "Which backend runs CPU tensors"; ``python -m hal.bench.cpu_selection
--gemm``). Otherwise it is 40, between opencl and the reference: the torch kernels are about as
fast as opencl at m >= 256 and slower below (1.5-2.6x faster than the reference), and the portable C
path was not measured on a CPU that needs it. Priority is static for a process; a build that fails
after it was ranked 60 leaves this process on the torch kernels, and is recorded so that later
processes rank 40.

Native code can crash its process, so the backend has a canary key (the switch, the compiler, the
flags, the CPU and these sources): unihal runs its operators once in a child process
(:mod:`hal.canary`) before it is available, and again whenever one of those changes.
"""

from __future__ import annotations

import torch

from hal.backends.cpu import native
from hal.canary import canaries_enabled, proving
from hal.ops.ep_local import EP_COMBINE_REDUCE
from hal.ops.gemm import GEMM_FP8_NT, M_GROUPED_CONTIGUOUS, M_GROUPED_MASKED
from hal.ops.fp8_quant import PER_BLOCK_CAST, PER_TOKEN_CAST, per_block_cast_reference, per_token_cast_reference
from hal.ops.gemm_bf16 import GEMM_BF16_NT, M_GROUPED_BF16_CONTIGUOUS, M_GROUPED_BF16_MASKED
from hal.ops.mla import MLA_DECODE
from hal.ops.mla_fp8_cache import QUANTIZE_MLA_KV_CACHE, quantize_mla_kv_cache_reference
from hal.ops.mla_schedule import one_part_scheduler
from hal.plugin import Availability, BackendInfo, hookimpl

PRIORITY = 40  # torch kernels: below opencl
NATIVE_PRIORITY = 60  # native kernels with the AVX-512 BF16 fast path: above opencl


def priority() -> int:
    return NATIVE_PRIORITY if native.expected_fast() else PRIORITY


@hookimpl
def hal_backend_info() -> BackendInfo:
    return BackendInfo(
        description="CPU FP8 GEMMs and MLA decode: native C kernels (AVX-512 BF16 dot products) built here, else torch CPU kernels",
        priority=priority(),
        device_types=("cpu",),
        contract_versions={
            op.name: op.version
            for op in (GEMM_FP8_NT, M_GROUPED_CONTIGUOUS, M_GROUPED_MASKED, GEMM_BF16_NT, M_GROUPED_BF16_CONTIGUOUS, M_GROUPED_BF16_MASKED,
                       PER_TOKEN_CAST, PER_BLOCK_CAST, QUANTIZE_MLA_KV_CACHE, MLA_DECODE, EP_COMBINE_REDUCE)
        },
    )


@hookimpl
def hal_backend_availability() -> Availability:
    # Builds the native library when needed (the compiler runs in its own process); loads it only
    # in the canary child, or where canaries are off: elsewhere the canary proves it first.
    threads = torch.get_num_threads()
    _, words = native.describe(threads, try_load=proving("cpu") or not canaries_enabled())
    if words.startswith("torch kernels"):
        words += f", torch {torch.__version__} CPU ({torch.backends.cpu.get_cpu_capability()}, {threads} threads)"
    return Availability(True, device=words)


@hookimpl
def hal_backend_canary_key() -> str:
    return native.canary_key()


def _kernels():
    """The native library, or None for the torch kernels (decided per call: HAL_CPU_NATIVE is read each time)."""
    return native.library()


@hookimpl
def hal_gemm_fp8_nt(a, a_scales, b, b_scales, out):
    lib = _kernels()
    if lib is not None:
        from hal.backends.cpu.gemm_native import gemm_fp8_nt

        return gemm_fp8_nt(lib, a, a_scales, b, b_scales, out)
    from hal.backends.cpu.gemm_fp8 import gemm_fp8_nt

    gemm_fp8_nt(a, a_scales, b, b_scales, out)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_contiguous(a, a_scales, b, b_scales, out, m_indices):
    lib = _kernels()
    if lib is not None:
        from hal.backends.cpu.gemm_native import m_grouped_contiguous

        return m_grouped_contiguous(lib, a, a_scales, b, b_scales, out, m_indices)
    from hal.backends.cpu.gemm_fp8 import m_grouped_contiguous

    m_grouped_contiguous(a, a_scales, b, b_scales, out, m_indices)


@hookimpl
def hal_m_grouped_gemm_fp8_nt_masked(a, a_scales, b, b_scales, out, masked_m, expected_m):
    lib = _kernels()
    if lib is not None:
        from hal.backends.cpu.gemm_native import m_grouped_masked

        return m_grouped_masked(lib, a, a_scales, b, b_scales, out, masked_m)
    from hal.backends.cpu.gemm_fp8 import m_grouped_masked

    m_grouped_masked(a, a_scales, b, b_scales, out, masked_m)


@hookimpl
def hal_gemm_bf16_nt(a, b, out):
    from hal.backends.cpu.gemm_bf16 import gemm_bf16_nt

    gemm_bf16_nt(_kernels(), a, b, out)


@hookimpl
def hal_m_grouped_gemm_bf16_nt_contiguous(a, b, out, m_indices):
    from hal.backends.cpu.gemm_bf16 import m_grouped_contiguous

    m_grouped_contiguous(_kernels(), a, b, out, m_indices)


@hookimpl
def hal_m_grouped_gemm_bf16_nt_masked(a, b, out, masked_m, expected_m):
    from hal.backends.cpu.gemm_bf16 import m_grouped_masked

    m_grouped_masked(_kernels(), a, b, out, masked_m)


def _cast(x, native_cast: str, reference):
    """The native cast (or KV cache quantisation) named ``native_cast`` in :mod:`hal.backends.cpu.casts`, or the reference without the library."""
    lib = _kernels()
    if lib is None:
        return reference(x)
    from hal.backends.cpu import casts

    return getattr(casts, native_cast)(lib, x)


@hookimpl
def hal_per_token_cast_to_fp8(x):
    return _cast(x, "per_token_cast", per_token_cast_reference)


@hookimpl
def hal_per_block_cast_to_fp8(x):
    return _cast(x, "per_block_cast", per_block_cast_reference)


@hookimpl
def hal_quantize_mla_kv_cache(k_cache):
    return _cast(k_cache, "mla_kv_cache", quantize_mla_kv_cache_reference)


@hookimpl
def hal_ep_combine_reduce(rows, src_idx, num_tokens, weights):
    lib = _kernels()
    if lib is not None:
        from hal.backends.cpu.ep import combine_reduce_native

        return combine_reduce_native(lib, rows, src_idx, num_tokens, weights, torch.get_num_threads())
    from hal.backends.cpu.ep import combine_reduce

    return combine_reduce(rows, src_idx, num_tokens, weights)


# Both MLA paths walk every sequence whole (the native kernel splits long sequences itself when
# there are too few to share among its threads) and read no schedule: the one-part schedule.
hal_get_mla_metadata = hookimpl(one_part_scheduler)


@hookimpl
def hal_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal):
    lib = _kernels()
    if lib is not None:
        from hal.backends.cpu.mla_native import mla_decode

        return mla_decode(lib, q, k_cache, block_table, cache_seqlens, softmax_scale, causal, torch.get_num_threads())
    from hal.ops.mla_reference import mla_decode_reference

    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal)
