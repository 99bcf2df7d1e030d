"""This machine's measured limits: a large copy (bytes read + written per second) and a large
matmul (FLOP/s), measured once per process and device. Fractions of peak are relative to these
measurements, not to datasheet numbers, so they mean the same on every machine."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from hal.bench.timing import measure

__all__ = ["Peaks", "measured_peaks"]


@dataclass(frozen=True)
class Peaks:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str
    copy_size_bytes: int
    matmul_size: int


@functools.lru_cache(maxsize=None)
def measured_peaks(device: str) -> Peaks:
    """Copy: clone of a 256 MiB (CPU: 64 MiB) buffer. Matmul: bf16 8192^2 on GPUs, fp32 2048^2 on CPUs."""
    accelerator = device != "cpu"
    elements = (256 if accelerator else 64) * 2**20 // 4
    source = torch.empty(elements, dtype=torch.float32, device=device).uniform_()
    destination = torch.empty_like(source)
    copy = measure(lambda: destination.copy_(source), device, warmup=2, repeats=10)
    size = 8192 if accelerator else 2048
    dtype = torch.bfloat16 if accelerator else torch.float32
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul = measure(lambda: a @ b, device, warmup=2, repeats=10)
    return Peaks(
        copy_bytes_per_s=2 * source.numel() * 4 / copy.median_s,
        matmul_flops_per_s=2 * size**3 / matmul.median_s,
        matmul_dtype=str(dtype).removeprefix("torch."),
        copy_size_bytes=source.numel() * 4,
        matmul_size=size,
    )
