"""AMD GPU architectures the ROCm backend knows, and the kernel tuning for each.

Tuning tables respect each architecture's LDS (shared memory) per workgroup and its FP8 format.
They are starting points derived from the hardware limits, not yet measured on AMD hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from hal.backends.triton.tuning import FP8_E4M3FN, FP8_E4M3FNUZ, GemmConfig, MlaConfig, Tuning

__all__ = ["Arch", "ARCHS", "arch_of", "gemm_lds_bytes", "tuning_for"]


@dataclass(frozen=True)
class Arch:
    """One gfx architecture: products, FP8 format of its dot instructions, LDS bytes per workgroup."""

    name: str
    products: str
    fp8_format: str
    fp8_dot: bool
    lds_bytes: int
    wavefront: int = 64


ARCHS: dict[str, Arch] = {
    "gfx942": Arch("gfx942", "MI300X, MI300A, MI325X", FP8_E4M3FNUZ, True, 64 * 1024),
    "gfx950": Arch("gfx950", "MI350X, MI355X", FP8_E4M3FN, True, 160 * 1024),
    "gfx90a": Arch("gfx90a", "MI210, MI250X", FP8_E4M3FN, False, 64 * 1024),
}


def arch_of(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


def gemm_lds_bytes(config: GemmConfig, operand_bytes: int = 1) -> int:
    """LDS the FP8 GEMM kernel stages per workgroup: one A and one B K-block per pipeline stage."""
    return config.num_stages * (config.block_m + config.block_n) * 128 * operand_bytes


def _gemm_table(arch: Arch):
    operand_bytes = 1 if arch.fp8_dot else 2  # widened to fp16 without FP8 dot instructions

    def config(m: int, n: int, k: int) -> GemmConfig:
        block_m = 64 if m > 32 else 32 if m > 16 else 16
        stages = 4
        candidate = GemmConfig(block_m=block_m, block_n=128, num_warps=4, num_stages=stages)
        while stages > 1 and gemm_lds_bytes(candidate, operand_bytes) > arch.lds_bytes:
            stages -= 1
            candidate = GemmConfig(block_m=block_m, block_n=128, num_warps=4, num_stages=stages)
        return candidate

    return config


def tuning_for(arch: Arch) -> Tuning:
    # One 64-token page of K is 64 x 576 bf16 = 72 KiB: pipelining two needs more LDS than MI300 has.
    mla_stages = 2 if arch.lds_bytes >= 2 * 64 * 576 * 2 else 1
    return Tuning(
        name=arch.name,
        gemm=_gemm_table(arch),
        mla=MlaConfig(block_h=16, num_warps=4, num_stages=mla_stages),
        fp8_format=arch.fp8_format,
        fp8_dot=arch.fp8_dot,
        launch_options={"waves_per_eu": 2, "matrix_instr_nonkdim": 16},
    )
