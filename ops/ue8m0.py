"""UE8M0 scales and DeepGEMM's current cast helpers (its ``deep_gemm.utils``), in torch.

A UE8M0 scale is a power of two: an 8-bit biased exponent, no sign, no mantissa. DeepGEMM's SM100
kernels take scales in that form, four exponents packed per int32 along K; its casts produce
them with ``use_ue8m0=True``: ``sf = 2 ** ceil(log2(amax / 448))`` computed on the float32 bits
(exponent + 1 whenever the mantissa is not zero), clamped to the normal exponents [1, 254].

Every FP8 GEMM of :mod:`hal.ops.gemm_v2` accepts float32 scales (UE8M0 or not) and packed int32
UE8M0 scales, which it unpacks exactly before dispatch. These casts are torch code on the input's
device, as DeepGEMM's own helpers are; the dispatched casts of :mod:`hal.ops.fp8_quant` remain the
operators backends implement.

Cast numerics (DeepGEMM's helpers): amax over each slice clamped below at 1e-4, ``sf = amax /
448`` (then rounded up to UE8M0 when asked), values times ``1 / sf`` rounded to e4m3fn; slices
past the data are zero padding.
"""

from __future__ import annotations

import torch

from hal.checks import expect_tensor
from hal.errors import ArgumentError, DTypeError, ShapeError, ValueRangeError

__all__ = [
    "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int",
    "per_token_cast_to_fp8", "per_channel_cast_to_fp8", "per_block_cast_to_fp8", "per_custom_dims_cast_to_fp8",
    "get_mn_major_tma_aligned_tensor", "get_mn_major_tma_aligned_packed_ue8m0_tensor", "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor",
    "transform_sf_into_required_layout",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(op: str, name: str, value: object, dtypes: object = _FLOATS, dims: tuple[str, ...] | None = None) -> torch.Tensor:
    """A dense tensor of ``dtypes`` (and of ``len(dims)`` dimensions when given), or a typed error
    naming it: these helpers are torch code, which would otherwise fail deep inside on a sparse,
    nested, 0-d or non-tensor argument."""
    return expect_tensor(op, name, value, dtypes=dtypes, shape=None if dims is None else (None,) * len(dims), dims=dims)


def expect_scales(op: str, name: str, value: object, dtypes: object = None) -> torch.Tensor:
    """Scales [(G,) MN, K']: a dense 2-d or 3-d tensor, of ``dtypes`` when given."""
    value = _tensor(op, name, value, dtypes)
    if value.dim() not in (2, 3):
        raise ShapeError(op, name, "scales [MN, K'] or [G, MN, K']", f"a {value.dim()}-d tensor", f"Pass '{name}' as 2-d or 3-d scales.")
    return value
AMAX_FLOOR = 1e-4


def _align(x: int, y: int) -> int:
    return -(-x // y) * y


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """float scales -> the smallest power of two >= |x| (float32), exponents clamped to [1, 254]."""
    x = _tensor("ceil_to_ue8m0", "x", x)
    bits = x.abs().float().contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """float32 powers of two [..., 4k] -> int32 [..., k], four exponent bytes per int (lowest first)."""
    op = "pack_ue8m0_to_int"
    if isinstance(x, torch.Tensor) and x.dtype != torch.float32:
        raise DTypeError(op, "x", "float32 UE8M0 scales", f"dtype {x.dtype}", "Round them with ceil_to_ue8m0 first.")
    x = _tensor(op, "x", x, torch.float32)
    if x.dim() == 0:
        raise ShapeError(op, "x", "scales [..., 4k]", "a 0-d tensor", "Pass the scales with their last dimension.")
    if x.shape[-1] % 4:
        raise ShapeError(op, "x", "a last dimension that is a multiple of 4", f"{x.shape[-1]}", "Pad the scales with 1.0 to a multiple of 4.")
    bits = x.contiguous().view(torch.int32)
    if not x.is_meta and bool(((bits < 0) | ((bits & 0x7FFFFF) != 0)).any()):  # a meta tensor has no values to check
        raise ValueRangeError(op, "x", "non-negative powers of two (UE8M0 values)", "a value with a sign or a mantissa", "Round with ceil_to_ue8m0.")
    return (bits >> 23).to(torch.uint8).view(torch.int32)


def _pack_padded(sf: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales [..., n] packed four per int32, padded with 1.0 (exponent 127) to a multiple of 4."""
    columns = sf.shape[-1]
    return pack_ue8m0_to_int(torch.nn.functional.pad(sf, (0, _align(columns, 4) - columns), value=1.0))


def unpack_ue8m0_from_int(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., k] -> float32 [..., 4k]: the inverse of :func:`pack_ue8m0_to_int` (exact)."""
    packed = _tensor("unpack_ue8m0_from_int", "packed", packed, torch.int32)
    if packed.dim() == 0:
        raise ShapeError("unpack_ue8m0_from_int", "packed", "packed scales [..., k]", "a 0-d tensor", "Pass the packed scales with their last dimension.")
    # Row-major copy (contiguous() keeps odd strides of size-1 dimensions; byte views need unit ones).
    dense = packed.clone(memory_format=torch.contiguous_format)
    return (dense.view(torch.uint8).to(torch.int32) << 23).view(torch.float32)


def _scales(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scales [M, ceil(K / gran_k)]); packed int32 [M, ceil(ceil(K/gran_k)/4)] with use_packed_ue8m0."""
    if isinstance(x, torch.Tensor) and x.dim() != 2:
        raise ShapeError("per_token_cast_to_fp8", "x", "a 2-d tensor [M, K]", f"{x.dim()}-d", "Flatten the tokens.")
    m, k = _tensor("per_token_cast_to_fp8", "x", x, dims=("M", "K")).shape
    padded = torch.zeros(m, _align(k, gran_k), dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    view = padded.view(m, -1, gran_k)
    sf = _scales(view.abs().amax(dim=2), use_ue8m0 or use_packed_ue8m0)
    values = (view * (1.0 / sf).unsqueeze(2)).to(FP8).view(m, -1)[:, :k].contiguous()
    return values, (_pack_padded(sf) if use_packed_ue8m0 else sf)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (M a multiple of gran_k) -> (e4m3 [M, N], scales [M / gran_k, N]): one scale per gran_k rows of a column."""
    m, n = _tensor("per_channel_cast_to_fp8", "x", x, dims=("M", "N")).shape
    if m % gran_k:
        raise ShapeError("per_channel_cast_to_fp8", "x", f"rows a multiple of {gran_k}", f"{m}", "Pad the rows.")
    view = x.float().view(-1, gran_k, n)
    sf = _scales(view.abs().amax(dim=1), use_ue8m0)
    return (view * (1.0 / sf).unsqueeze(1)).to(FP8).view(m, n), sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] -> (e4m3 [M, N], scales [ceil(M / gran_k), ceil(N / gran_k)]), one per gran_k x gran_k block."""
    m, n = _tensor("per_block_cast_to_fp8", "x", x, dims=("M", "N")).shape
    padded = torch.zeros(_align(m, gran_k), _align(n, gran_k), dtype=torch.float32, device=x.device)
    padded[:m, :n] = x.float()
    view = padded.view(-1, gran_k, padded.shape[1] // gran_k, gran_k)
    sf = _scales(view.abs().amax(dim=(1, 3), keepdim=True), use_ue8m0)
    values = (view * (1.0 / sf)).to(FP8).view_as(padded)[:m, :n].contiguous()
    return values, sf.view(view.shape[0], view.shape[2])


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims: tuple[int, ...], use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per index of ``dims`` (amax over the other dimensions): the indexer's per-key cast is ``dims=(0,)``."""
    op = "per_custom_dims_cast_to_fp8"
    x = _tensor(op, "x", x)
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and -x.dim() <= d < x.dim() for d in dims):
        raise ValueRangeError(op, "dims", f"a tuple of dimensions of x (x is {x.dim()}-d)", repr(dims), "Name the dimensions that keep a scale each.")
    dims = tuple(d % x.dim() for d in dims)
    others = tuple(i for i in range(x.dim()) if i not in set(dims))
    sf = _scales(x.abs().float().amax(dim=others, keepdim=True), use_ue8m0)
    return (x.float() * (1.0 / sf)).to(FP8), sf.squeeze()


def _tma_aligned(mn: int, element_size: int) -> int:
    """MN rounded up so each column of an MN-major tensor starts 16-byte aligned (TMA's rule)."""
    return _align(mn, 16 // element_size)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Scales [(G,) MN, K'] in DeepGEMM's MN-major layout: the same values with strides
    ``(aligned * K', 1, aligned)`` (``(1, aligned)`` in 2-d), ``aligned`` = MN rounded up to 16
    bytes; returned as given when already so."""
    sf = expect_scales("get_mn_major_tma_aligned_tensor", "sf", sf, (torch.float32, torch.int32, torch.bfloat16, torch.float16))
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    groups, mn, columns = batched.shape
    aligned = _tma_aligned(mn, sf.element_size())
    if batched.stride(1) == 1 and batched.stride(2) == aligned and (groups == 1 or batched.stride(0) == aligned * columns):
        return sf
    storage = torch.empty(groups, columns, aligned, dtype=sf.dtype, device=sf.device)
    storage[:, :, :mn] = batched.transpose(1, 2)
    out = storage.transpose(1, 2)[:, :mn]
    return out if sf.dim() == 3 else out.squeeze(0)


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor, psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """float32 UE8M0 scales [(G,) MN, K'] -> int32 [(G,) MN, ceil(K'/4)], four exponent bytes per
    int (lowest K first), in the MN-major TMA-aligned layout; padding bytes are 0, as DeepGEMM's.

    The exponent byte is taken from the float's bits (a scale that is not a power of two loses its
    mantissa, as in DeepGEMM's torch form; its kernel refuses one). ``psum_layout`` (int32 [G]
    cumulative row ends of the contiguous layout, 2-d ``sf`` only): the rows between a group's end
    and the next group's aligned start are not read and pack as zeros."""
    op = "get_mn_major_tma_aligned_packed_ue8m0_tensor"
    sf = _tensor(op, "sf", sf, torch.float32)
    if sf.dtype != torch.float32 or sf.dim() not in (2, 3):
        raise DTypeError(op, "sf", "float32 scales [(G,) MN, K']", f"{sf.dtype} of {sf.dim()} dimensions", "Pass the float32 UE8M0 scales.")
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    groups, mn, columns = batched.shape
    exponents = (batched.contiguous().view(torch.int32) >> 23).to(torch.uint8)
    if psum_layout is not None:
        if sf.dim() != 2 or psum_layout.dtype != torch.int32 or psum_layout.dim() != 1 or psum_layout.numel() == 0:
            raise ShapeError(op, "psum_layout", "int32 [G] row ends (G >= 1) with 2-d scales", f"{psum_layout.dtype} {list(psum_layout.shape)} with {sf.dim()}-d scales",
                             "Pass the contiguous layout's cumulative row ends.")
        from hal.ops.gemm import get_m_alignment_for_contiguous_layout

        align = get_m_alignment_for_contiguous_layout()
        ends = psum_layout.to(device=sf.device, dtype=torch.int64)
        starts = torch.zeros_like(ends)
        starts[1:] = (ends[:-1] + align - 1) // align * align
        rows = torch.arange(mn, device=sf.device)
        owner = torch.searchsorted(ends, rows, right=True).clamp(max=ends.numel() - 1)
        read = (rows < ends[owner]) & (rows >= starts[owner])
        exponents = exponents * read.view(1, mn, 1).to(torch.uint8)
    padded_k = _align(columns, 4)
    padded = torch.zeros(groups, mn, padded_k, dtype=torch.uint8, device=sf.device)
    padded[:, :, :columns] = exponents
    packed = padded.view(torch.int32)  # [G, MN, padded_k / 4]
    aligned = _tma_aligned(mn, 4)
    storage = torch.zeros(groups, padded_k // 4, aligned, dtype=torch.int32, device=sf.device)
    storage[:, :, :mn] = packed.transpose(1, 2)
    out = storage.transpose(1, 2)[:, :mn]
    return out if sf.dim() == 3 else out.squeeze(0)


def get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor(
    sf: torch.Tensor, grouped_layout: torch.Tensor, ks_cpu: list[int] | None, gran_k: int, k_alignment: int, use_psum_layout: bool = False,
) -> torch.Tensor:
    """K-grouped float32 UE8M0 scales [sf_k, MN] -> int32 [packed_sf_k, MN]: each group's scale rows
    packed four per int32 along K (lowest K first, zero bytes past the group's last row), the groups'
    packed rows one after another (DeepGEMM's layout for its k-grouped SM100 GEMMs).

    Group g holds ``k_g`` columns of K: ``grouped_layout[g]`` (int32 [G]), or with
    ``use_psum_layout`` the cumulative ends of the groups laid out at ``k_alignment`` boundaries
    (``k_g = end_g - align(end_{g-1}, k_alignment)``). Its ``ceil(k_g / gran_k)`` scale rows follow
    the previous group's in ``sf``, and it packs into ``ceil(k_g / (4 gran_k))`` rows. The result has
    ``sum ceil(k / (4 gran_k))`` over ``ks_cpu`` rows, or without ``ks_cpu`` (psum only) the bound
    ``(sf_k + 3 G) // 4``; rows past the groups' are zero. The exponent byte is taken from each float's
    bits, as :func:`get_mn_major_tma_aligned_packed_ue8m0_tensor` does."""
    op = "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor"
    sf = _tensor(op, "sf", sf, torch.float32, dims=("sf_k", "MN"))
    layout = _tensor(op, "grouped_layout", grouped_layout, torch.int32, dims=("num_groups",))
    if type(gran_k) is not int or gran_k not in (32, 128):
        raise ValueRangeError(op, "gran_k", "32 or 128", repr(gran_k), "Pass the K granularity of the scales.")
    if isinstance(k_alignment, bool) or not isinstance(k_alignment, int) or k_alignment <= 0 or k_alignment % 32:
        raise ValueRangeError(op, "k_alignment", "a positive multiple of 32", repr(k_alignment), "Pass the K alignment of the grouped layout.")
    sf_k, mn = sf.shape
    groups = layout.shape[0]
    if groups > 128 or mn % 4:
        raise ShapeError(op, "sf", "MN a multiple of 4 and at most 128 groups", f"MN={mn}, {groups} groups", "Pad MN to a multiple of 4.")
    if ks_cpu is not None and (not isinstance(ks_cpu, (list, tuple)) or any(type(k) is not int for k in ks_cpu)):
        raise DTypeError(op, "ks_cpu", "None or a list of ints (each group's K)", type(ks_cpu).__name__, "Pass the groups' K sizes as Python ints.")
    synced = ks_cpu is not None and len(ks_cpu) > 0
    if synced and len(ks_cpu) != groups:
        raise ShapeError(op, "ks_cpu", f"{groups} sizes (one per group)", f"{len(ks_cpu)}", "Pass one K per group, or None with use_psum_layout.")
    if not synced and not use_psum_layout:
        raise ArgumentError(op, "ks_cpu", "the groups' K sizes (or use_psum_layout=True)", repr(ks_cpu), "Pass ks_cpu.")
    entries = [int(v) for v in layout.tolist()]
    sizes, previous = [], 0
    for entry in entries:
        sizes.append(entry - _align(previous, k_alignment) if use_psum_layout else entry)
        previous = entry
    if any(k < 0 for k in sizes):
        raise ValueRangeError(op, "grouped_layout", "non-negative group sizes (non-decreasing ends with use_psum_layout)", str(entries), "Pass the groups' K layout.")
    rows = [-(-k // gran_k) for k in sizes]
    if sum(rows) > sf_k or (synced and not use_psum_layout and sum(-(-k // gran_k) for k in ks_cpu) != sf_k):
        raise ShapeError(op, "sf", f"{sum(rows)} scale rows for the groups' K (one per {gran_k})", f"{sf_k} rows", "Pass the scales of these groups.")
    packed_rows = sum(-(-k // (4 * gran_k)) for k in ks_cpu) if synced else (sf_k + 3 * groups) // 4
    out = torch.zeros(packed_rows, mn, dtype=torch.int32, device=sf.device)
    row = packed = 0
    for count in rows:
        if count and packed < packed_rows:  # the group's scales packed as the MN-major layout packs them, read K-major
            words = get_mn_major_tma_aligned_packed_ue8m0_tensor(sf[row : row + count].T).T  # [ceil(count / 4), MN]
            take = min(words.shape[0], packed_rows - packed)
            out[packed : packed + take] = words[:take]
        row, packed = row + count, packed + -(-count // 4)
    return out


def _granularity(op: str, recipe: object, is_sfa: bool | None) -> tuple[int, int]:
    """(rows per scale along MN, columns per scale along K) from DeepGEMM's recipe forms: a
    3-tuple (A's rows, B's rows, K) needs ``is_sfa``; a pair (MN, K) must come without it."""
    if isinstance(recipe, (tuple, list)) and len(recipe) == 3 and all(isinstance(v, int) for v in recipe):
        if is_sfa is None:
            raise ValueRangeError(op, "is_sfa", "True or False with a 3-element recipe", "None", "Say whether these are A's scales (is_sfa=True) or B's.")
        return (recipe[0] if is_sfa else recipe[1]), recipe[2]
    if isinstance(recipe, (tuple, list)) and len(recipe) == 2 and all(isinstance(v, int) for v in recipe):
        if is_sfa is not None:
            raise ValueRangeError(op, "is_sfa", "None with a (MN, K) recipe", repr(is_sfa), "Drop is_sfa, or pass the 3-element recipe.")
        return recipe[0], recipe[1]
    raise ValueRangeError(op, "recipe", "(gran_a, gran_b, gran_k) or (gran_mn, gran_k)", repr(recipe), "Pass a recipe such as (1, 128, 128).")


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None, is_sfa: bool | None = None,
                                      disable_ue8m0_cast: bool = False, psum_layout=None) -> torch.Tensor:
    """DeepGEMM's scale-layout step, in its SM90 form (hal's GEMMs take float32 scales, UE8M0 or
    not, in any layout): per-row scales (``gran_mn`` 1) come back MN-major and TMA-aligned, block
    scales (``gran_mn`` 128) as given; packed int32 UE8M0 scales are unpacked first (exact).

    Args:
        sf: float32 [(G,) ceil(mn / gran_mn), ceil(k / gran_k)], or packed int32 [(G,) mn, ceil(ceil(k / gran_k) / 4)].
        recipe: ``(gran_a, gran_b, gran_k)`` with ``is_sfa``, or ``(gran_mn, gran_k)`` without it.
    """
    op = "transform_sf_into_required_layout"
    gran_mn, gran_k = _granularity(op, recipe, is_sfa)
    columns = -(-k // gran_k)
    lead = () if num_groups is None else (num_groups,)
    if sf.dtype == torch.int32:
        want = lead + (mn, -(-columns // 4))
        if tuple(sf.shape) != want:
            raise ShapeError(op, "sf", f"packed int32 scales {list(want)}", f"{list(sf.shape)}", "Pass one packed row per MN index.")
        sf = unpack_ue8m0_from_int(sf)[..., :columns]
    else:
        want = lead + (-(-mn // gran_mn), columns)
        if sf.dtype != torch.float32:
            raise DTypeError(op, "sf", "float32 or packed int32 scales", f"dtype {sf.dtype}", "Pass the scales the casts produce.")
        if tuple(sf.shape) != want:
            raise ShapeError(op, "sf", f"float32 scales {list(want)} (recipe {tuple(recipe)})", f"{list(sf.shape)}",
                             f"Give one scale per {gran_mn} rows and {gran_k} columns.")
    return get_mn_major_tma_aligned_tensor(sf) if gran_mn == 1 else sf
