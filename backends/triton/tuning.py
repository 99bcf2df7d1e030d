"""Per-target tuning of the shared kernels: tile sizes, launch options and the FP8 format.

A vendor backend describes its hardware with one :class:`Tuning`; the kernels stay the same.
Tables are plain functions of the problem shape so a vendor can read and override them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GemmConfig", "MlaConfig", "Tuning", "FP8_E4M3FN", "FP8_E4M3FNUZ", "nvidia_gemm_config", "interpreter_gemm_config"]

FP8_E4M3FN = "e4m3fn"  # OCP e4m3 (NVIDIA Ada/Hopper, AMD MI350): DeepGEMM's operand format
FP8_E4M3FNUZ = "e4m3fnuz"  # AMD MI300: exponent bias 8, max 240, a single NaN code 0x80, no -0


@dataclass(frozen=True)
class GemmConfig:
    """FP8 GEMM tile: BLOCK_M and BLOCK_N divide 128 (a tile's columns share one RHS scale block)."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MlaConfig:
    """MLA decode: query rows per program (>= 16 for tl.dot) and launch shape."""

    block_h: int = 16
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Tuning:
    """Everything target-specific the shared kernels take.

    Attributes:
        name: shown in reports (``"sm90"``, ``"gfx942"``, ``"interpreter"``).
        gemm: picks a :class:`GemmConfig` from (M, N, K).
        mla: the MLA decode configuration.
        fp8_format: the FP8 type the GPU's dot instructions take; e4m3fn operands are
            reinterpreted in-kernel for e4m3fnuz targets (see ``conversions.e4m3fn_bits_as_fnuz``).
        fp8_dot: False on GPUs without FP8 dot instructions: operands are widened to fp16.
        launch_options: extra keyword arguments for every launch (AMD: ``waves_per_eu``...).
    """

    name: str
    gemm: Callable[[int, int, int], GemmConfig]
    mla: MlaConfig = MlaConfig()
    fp8_format: str = FP8_E4M3FN
    fp8_dot: bool = True
    launch_options: Mapping[str, Any] = field(default_factory=dict)


def nvidia_gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """Hopper/Ada tiles: wide N, M shrunk for decode-sized batches."""
    block_m = 64 if m > 32 else 32 if m > 16 else 16
    return GemmConfig(block_m=block_m, block_n=128, num_warps=4, num_stages=4 if k >= 1024 else 3)


def interpreter_gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """Small tiles: in the CPU interpreter every program runs serially in numpy."""
    return GemmConfig(block_m=32 if m > 16 else 16, block_n=64, num_warps=4, num_stages=1)
