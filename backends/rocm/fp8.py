"""FP8 format conversion for AMD MI300 (gfx942), whose dot instructions take e4m3fnuz.

e4m3fnuz has exponent bias 8 (e4m3fn: 7), a largest value of 240 (e4m3fn: 448), one NaN code
(0x80, which is -0 in e4m3fn) and no negative zero. Reading an e4m3fn code as e4m3fnuz gives
exactly half its value, so DeepGEMM-format operands convert exactly, values above 240 included,
by moving the special codes and doubling the scale. The GEMM kernels do the same in registers
(``hal.backends.triton.conversions.e4m3fn_bits_as_fnuz``); this host version is for converting
weights once ahead of time and for checking the mapping.
"""

from __future__ import annotations

import torch

__all__ = ["e4m3fn_to_e4m3fnuz"]


def e4m3fn_to_e4m3fnuz(values: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn tensor, float32 scales) -> (float8_e4m3fnuz tensor, scales * 2), the same numbers.

    -0 becomes +0 and the e4m3fn NaNs (0x7F, 0xFF) become the e4m3fnuz NaN (0x80).
    """
    if values.dtype != torch.float8_e4m3fn:
        raise TypeError(f"e4m3fn_to_e4m3fnuz: values must be float8_e4m3fn, got {values.dtype}")
    codes = values.view(torch.uint8)
    codes = torch.where(codes == 0x80, torch.zeros_like(codes), codes)
    codes = torch.where((codes & 0x7F) == 0x7F, torch.full_like(codes, 0x80), codes)
    return codes.view(torch.float8_e4m3fnuz), scales * 2.0
