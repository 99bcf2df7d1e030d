"""MLA decode (FlashMLA's ``flash_mla_with_kvcache``, dense bf16/fp16 KV cache) on the native
kernel ``native/mla_decode.c``: a ctypes call on the operands' memory.

The kernel. Work items are (sequence, KV head, block of at most 128 rows), rows being the
``s_q * h_q / h_kv`` (query token, head) pairs that share one KV head; when there are fewer such
items than twice the threads, each sequence's pages are also split and the pieces merged
afterwards (FlashMLA's split-KV combine). Items run longest first on a small persistent pthread
pool of ``threads`` threads. Per 64-key page of the sequence (keys past its end are never read,
and the block table only for the pages its length uses; the next page is prefetched):

- scores with the rows in the vector lanes: the item's q is packed once as channel pairs, each
  key's pairs are broadcast from the cache and ``vdpbf16ps`` accumulates in fp32 (bf16 products
  are exact in fp32); fp16 (not exact in bf16) widens the page to fp32 and uses fp32 FMAs;
- online softmax per row in fp32 (running max and sum, the output accumulator rescaled by
  ``exp(m_old - m_new)``), with a vectorised expf (about 1 ulp; exactly 0 for -inf, NaN kept);
- ``O += p @ V`` in fp32 FMAs with the fp32 ``p`` (bf16 V widened in registers). Rounding ``p`` to
  bf16 for ``vdpbf16ps``, as FlashMLA's GPU kernel does, would halve this step but fails the
  conformance per-element bound on short sequences (measured up to 1.9x the bound);
- finally ``out = O / l`` rounded to nearest even to q's dtype, ``lse = m + log(l)``.

Numerics are those of :func:`hal.ops.mla_reference.mla_decode_reference`, including its NaN and
infinity rules and the rows that see no key (out 0, lse +inf), up to the order of the fp32 sums
and the expf rounding: on the conformance cases the worst per-element error is 0.4 of the bound
for out (mostly where the two bf16 roundings of the output fall apart) and for lse, and cos_diff
stays below 4e-9 (threshold 1e-5). One deviation: ``vdpbf16ps`` reads bf16 subnormals (|x| <
1.2e-38) in q or k as zero, which shows only when the other factor is above about 1e30. Without
AVX-512 BF16 the C file compiles a portable scalar path with the same semantics (no such
deviation).

q's batch/token/head strides are passed through (its last dimension must be contiguous, as the
ops layer guarantees), as are k_cache's; block_table and cache_seqlens are used as contiguous
int32 copies when they are not already. Nothing the caller owns is kept or freed.
"""

from __future__ import annotations

import ctypes
import math

import torch

__all__ = ["mla_decode"]

_HEAD_DIM_QK = 576
_HEAD_DIM_V = 512
_PAGE = 64
_ERRORS = {
    1: "out of memory for its scratch buffers",
    2: "a block_table entry of a used page is outside k_cache",
    3: "a cache_seqlens entry is negative or longer than the block table's capacity",
    4: "inconsistent shapes",
}

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [
    _ptr, _i64, _i64, _i64,  # q, strides b, t, h
    _ptr, _i64, _i64, _i64,  # k_cache, strides block, slot, head
    _i64,  # num_blocks
    _ptr, _i64, _i64,  # block_table, row stride, max_pages
    _ptr,  # cache_seqlens
    _ptr, _ptr,  # out, lse
    _i32, _i32, _i32, _i32,  # batch, s_q, h_q, h_kv
    ctypes.c_float, _i32, _i32, _i32, _i32,  # scale, causal, fp16, flags, threads
]


def _bind(lib: ctypes.CDLL):
    """``lib.hal_mla_decode`` with its signature declared (on first use)."""
    fn = lib.hal_mla_decode
    if fn.argtypes is None or tuple(fn.argtypes) != tuple(_ARGTYPES):
        fn.argtypes = _ARGTYPES
        fn.restype = ctypes.c_int
    return fn


def mla_decode(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    threads: int,
    *,
    splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [b, s_q, h_q, 512] dtype of q, lse float32 [b, h_q, s_q])`` of MLA decode on CPU tensors.

    Arguments as validated by :func:`hal.ops.mla.validate_mla_decode` (``causal`` already False
    for s_q == 1 or not, either way); ``threads``: how many threads the kernel may use
    (``torch.get_num_threads()`` in the backend). ``splits``: force that many page splits per
    sequence (0: the kernel's choice; for tests).
    """
    batch, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    out = torch.empty(batch, s_q, h_q, _HEAD_DIM_V, dtype=q.dtype)
    lse = torch.empty(batch, h_q, s_q, dtype=torch.float32)
    if q.numel() == 0:
        out.zero_()
        lse.fill_(math.inf)
        return out, lse
    if q.dtype not in (torch.bfloat16, torch.float16) or k_cache.dtype != q.dtype or d != _HEAD_DIM_QK or k_cache.shape[1] != _PAGE:
        raise ValueError(f"native MLA decode: unexpected operands (q {q.dtype} {list(q.shape)}, k_cache {k_cache.dtype} {list(k_cache.shape)})")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    table = block_table.to(torch.int32).contiguous()
    seqlens = cache_seqlens.to(torch.int32).contiguous()
    flags = max(0, min(int(splits), 255)) << 8
    rc = _bind(lib)(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[0],
        table.data_ptr(), table.stride(0) if table.dim() == 2 else 0, table.shape[1] if table.dim() == 2 else 0,
        seqlens.data_ptr(),
        out.data_ptr(), lse.data_ptr(),
        batch, s_q, h_q, h_kv,
        float(softmax_scale), int(bool(causal) and s_q > 1), int(q.dtype == torch.float16), flags, max(1, int(threads)),
    )
    if rc:
        raise RuntimeError(f"native MLA decode {list(q.shape)} x {list(k_cache.shape)}: {_ERRORS.get(rc, f'error {rc}')}")
    return out, lse
