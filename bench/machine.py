"""Where a benchmark ran: the machine (CPU model, cores, memory), the versions of what was timed,
and how loaded the machine was. Timings from a shared machine are only comparable alongside
its load: a load average above the core count means other work competed for the cores."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from typing import Any

import torch

import hal
from hal.bench.memory import available_bytes, meminfo_bytes

__all__ = ["machine", "versions", "load"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The matmul-relevant ISA extensions the CPU reports (AVX-512, its bf16/VNNI, AMX)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^flags\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    except OSError:
        return []
    flags = match.group(1).split() if match else []
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx")))


def _memory_total() -> int:
    return meminfo_bytes("MemTotal", "SC_PHYS_PAGES")


def machine() -> dict[str, Any]:
    """CPU model, logical cores, torch's intra-op threads, ISA flags, memory total and available, GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "memory_bytes": _memory_total(),
        "memory_available_bytes": available_bytes("cpu"),
        "gpus": gpus,
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """python, torch, triton, pyopencl, numpy and unihal (None: not installed), CUDA/HIP of the torch build."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "triton": _version("triton"),
        "pyopencl": _version("pyopencl"),
        "numpy": _version("numpy"),
        "hal": hal.__version__,
    }


def load() -> dict[str, float]:
    """The 1, 5 and 15 minute load averages (os.getloadavg)."""
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen}
