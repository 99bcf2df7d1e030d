"""LogFMT-10: DeepEP's compressed format for low-latency combine payloads (``use_logfmt=True``).

Per 128 channels of a bf16 row, with ``amax`` / ``amin`` the largest / smallest magnitude there:
``log_amax = log2(amax)``, ``log_amin = max(log2(amin), log_amax - 32)``. The block is cast only
when ``log_amax < 0`` (every magnitude below 1) and ``log_amin < log_amax``; otherwise it travels
as bf16. A cast value is a sign bit and a 9-bit code: with ``step = (log_amax - log_amin) / 510``,
code 0 is zero and code ``c >= 1`` is ``2 ** (log_amin + (c - 1) * step)``; encoding picks the
code nearest in the linear domain (``floor(max((log2|x| - log_amin) / step + 2 - log2((1 +
2 ** step) / 2) / step, 0))``). Each block carries its (amax, amin) as two bf16 values, from
which the receiver recomputes ``step`` and whether the block was cast.

Accuracy: a cast element decodes within a factor ``2 ** (step / 2)`` of its magnitude (at most
``2 ** (32 / 1020) - 1``, about 2.2 %, relative), or to 0 / ``2 ** log_amin`` when it lies below
``2 ** log_amin``: ``|decoded - x| <= LOGFMT_RELATIVE * |x| + 2 ** log_amin``. hal computes
``log2``/``exp2`` exactly in float32 (DeepEP's kernels use the approximate hardware
instructions); both land within that bound.

Wire form here: int16 [rows, hidden + hidden / 64]: per channel the 10-bit value (sign << 9 |
code) or, in a block that is not cast, its bf16 bits; then per block the (amax, amin) bf16 bits.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK", "LOGFMT_RELATIVE", "logfmt_encode", "logfmt_decode", "logfmt_roundtrip"]

BLOCK = 128
CODE_MAX = 511  # 9 bits
STEPS = CODE_MAX - 1  # 510 intervals between log_amin and log_amax
MIN_CLIP = 32.0
LOGFMT_RELATIVE = 2.0 ** (MIN_CLIP / STEPS / 2) - 1.0


def _block_logs(amax: torch.Tensor, amin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_amax, log_amin, cast?) per block from its bf16 extremes (as float32)."""
    log_amax = torch.log2(amax)
    log_amin = torch.maximum(torch.log2(amin), log_amax - MIN_CLIP)  # log2(0) = -inf: clipped
    return log_amax, log_amin, (log_amax < 0) & (log_amin < log_amax)


def logfmt_encode(x: torch.Tensor) -> torch.Tensor:
    """bf16 [rows, hidden] (hidden % 128 == 0) -> int16 [rows, hidden + hidden / 64] (module docstring)."""
    rows, hidden = x.shape
    blocks = hidden // BLOCK
    bits = x.contiguous().view(torch.int16).view(rows, blocks, BLOCK)
    magnitude = x.float().abs().view(rows, blocks, BLOCK)
    amax = magnitude.amax(dim=2).to(torch.bfloat16)
    amin = magnitude.amin(dim=2).to(torch.bfloat16)
    log_amax, log_amin, cast = _block_logs(amax.float(), amin.float())
    step = (log_amax - log_amin) / STEPS
    safe_step = torch.where(cast, step, torch.ones_like(step))
    rounding = 2.0 - torch.log2((1.0 + torch.exp2(safe_step)) * 0.5) / safe_step
    scaled = (torch.log2(magnitude) - log_amin.unsqueeze(2)) / safe_step.unsqueeze(2) + rounding.unsqueeze(2)
    code = torch.floor(torch.clamp(scaled, min=0.0)).clamp(max=CODE_MAX).to(torch.int16)  # log2(0) = -inf -> code 0
    sign = (bits < 0).to(torch.int16)
    packed = torch.where(cast.unsqueeze(2), (sign << 9) | code, bits).view(rows, hidden)
    meta = torch.stack([amax, amin], dim=2).view(torch.int16).view(rows, 2 * blocks)
    return torch.cat([packed, meta], dim=1)


def logfmt_decode(encoded: torch.Tensor, hidden: int) -> torch.Tensor:
    """int16 [rows, hidden + hidden / 64] -> float32 [rows, hidden]."""
    rows = encoded.shape[0]
    blocks = hidden // BLOCK
    values = encoded[:, :hidden].contiguous().view(rows, blocks, BLOCK)
    meta = encoded[:, hidden:].contiguous().view(torch.bfloat16).float().view(rows, blocks, 2)
    log_amax, log_amin, cast = _block_logs(meta[..., 0], meta[..., 1])
    step = ((log_amax - log_amin) / STEPS).unsqueeze(2)
    code = (values & 0x1FF).float()
    magnitude = torch.where(code == 0, torch.zeros_like(code), torch.exp2((code - 1) * step + log_amin.unsqueeze(2)))
    decoded = torch.where(((values >> 9) & 1) == 1, -magnitude, magnitude)
    raw = values.view(torch.bfloat16).float()
    return torch.where(cast.unsqueeze(2), decoded, raw).view(rows, hidden)


def logfmt_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """What a receiver reads back for bf16 ``x`` [rows, hidden]: float32 [rows, hidden]."""
    return logfmt_decode(logfmt_encode(x), x.shape[1])


def logfmt_bound(x: torch.Tensor) -> torch.Tensor:
    """The per-element error bound of the round trip for ``x`` [rows, hidden] (float32)."""
    rows, hidden = x.shape
    magnitude = x.float().abs().view(rows, hidden // BLOCK, BLOCK)
    amax = magnitude.amax(dim=2).to(torch.bfloat16).float()
    amin = magnitude.amin(dim=2).to(torch.bfloat16).float()
    _, log_amin, _ = _block_logs(amax, amin)
    floor = torch.exp2(log_amin).unsqueeze(2)
    return (LOGFMT_RELATIVE * magnitude * 1.0001 + floor).view(rows, hidden) + math.ulp(1.0)
