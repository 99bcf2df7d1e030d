"""``deep_gemm.testing``: the helpers DeepGEMM's tests import, on any device hal runs on.

- :func:`calc_diff`: DeepGEMM's accuracy measure, ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64
  (0 for two all-zero tensors); its tests require < 1e-3 (FP8) or < 1e-5 (BF16).
- :func:`count_bytes`, :func:`assert_bitwise_equal`, :func:`test_filter`, :func:`ignore_env`.
- :func:`get_arch_major`: 9. hal implements DeepGEMM's SM90 (Hopper) numerics on every device:
  float32 scales, 128-wide K blocks; tests that branch on the architecture take that branch.
- :func:`bench` and :func:`bench_kineto`: seconds per call of ``fn``, measured on the host's clock
  after synchronising the device. DeepGEMM reads per-kernel times from a CUDA profiler trace;
  hal's operators may launch several kernels (or none, on a CPU), so the time of the whole call
  is returned, once per kernel name asked for.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["calc_diff", "count_bytes", "assert_bitwise_equal", "get_arch_major", "test_filter", "ignore_env", "bench", "bench_kineto"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 sum(x y) / sum(x^2 + y^2)`` in float64: 0 for equal tensors, NaN if either holds NaN."""
    x, y = x.double(), y.double()
    denominator = float((x * x + y * y).sum())
    if denominator == 0:  # both all zero
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denominator


def count_bytes(*tensors: Any) -> int:
    """Bytes held by the tensors (nested tuples and lists too; None counts 0)."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, (tuple, list)):
            total += count_bytes(*tensor)
        elif tensor is not None:
            total += tensor.numel() * tensor.element_size()
    return total


def assert_bitwise_equal(x: torch.Tensor, y: torch.Tensor, label: str = "") -> None:
    """Raise AssertionError naming the first differing element unless x and y are the same bytes."""
    assert x.shape == y.shape, f"shapes differ: {list(x.shape)} vs {list(y.shape)}"
    assert x.dtype == y.dtype, f"dtypes differ: {x.dtype} vs {y.dtype}"
    xb, yb = x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)
    if torch.equal(xb, yb):
        return
    differ = (xb != yb).flatten()
    first = int(differ.nonzero()[0]) // x.element_size()
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), x.shape))
    raise AssertionError(f"bitwise mismatch{f' ({label})' if label else ''}: {int(differ.sum())} of {differ.numel()} bytes differ; first element at {where}")


def get_arch_major() -> int:
    """9: the architecture whose numerics hal implements everywhere (see the module docstring)."""
    return 9


def test_filter(condition: Callable[[], bool]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated test only when ``condition()`` holds; otherwise say it was filtered."""
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if condition():
                return fn(*args, **kwargs)
            print(f"{fn.__name__}:\n > Filtered by {condition}\n")
            return None
        return wrapper
    return decorator


test_filter.__test__ = False  # a decorator, not a test, for pytest's collection


def ignore_env(name: str, condition: Callable[[], bool]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated function with environment variable ``name`` removed when ``condition()`` holds."""
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not condition():
                return fn(*args, **kwargs)
            saved = os.environ.pop(name, None)
            try:
                return fn(*args, **kwargs)
            finally:
                if saved is not None:
                    os.environ[name] = saved
        return wrapper
    return decorator


def _synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any], num_warmups: int = 5, num_tests: int = 10, high_precision: bool = False) -> float:
    """Mean seconds per call of ``fn`` over ``num_tests`` calls after ``num_warmups``."""
    for _ in range(num_warmups):
        fn()
    _synchronise()
    start = time.perf_counter()
    for _ in range(num_tests):
        fn()
    _synchronise()
    return (time.perf_counter() - start) / num_tests


def bench_kineto(fn: Callable[[], Any], kernel_names: str | tuple[str, ...], num_tests: int = 30, suppress_kineto_output: bool = False,
                 trace_path: str | None = None, flush_l2: bool = True, with_multiple_kernels: bool = False,
                 barrier: Callable[[], Any] | None = None) -> float | tuple[float, ...]:
    """Seconds per call of ``fn`` (the whole call, see the module docstring), as a float for one
    kernel name or a tuple with that time for each name of a tuple."""
    if not isinstance(kernel_names, (str, tuple)):
        raise TypeError(f"bench_kineto: kernel_names must be a str or a tuple of str, not {type(kernel_names).__name__}")
    fn()
    seconds = bench(fn, num_warmups=1, num_tests=num_tests)
    return tuple(seconds for _ in kernel_names) if isinstance(kernel_names, tuple) else seconds
