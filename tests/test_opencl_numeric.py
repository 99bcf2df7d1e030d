"""The OpenCL backend's float conversions (hal.backends.opencl.numeric) are bit-exact with torch's casts."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("pyopencl")
from hal.backends.opencl.device import list_devices  # noqa: E402

if not list_devices():
    pytest.skip("no OpenCL device", allow_module_level=True)

import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402

from hal.backends.opencl.device import runtime  # noqa: E402
from hal.backends.opencl.numeric import NUMERIC_SOURCE  # noqa: E402
from hal.backends.opencl.program import build  # noqa: E402

# Every conversion, scalar and 16-lane, applied elementwise (n is a multiple of 16).
CONVERSIONS_SOURCE = NUMERIC_SOURCE + r"""
__kernel void encode(__global const float* x, __global ushort* bf16, __global ushort* bf16v, __global ushort* fp16,
                     __global uchar* e4m3, __global uchar* e4m3v) {
    const int i = get_global_id(0);
    bf16[i] = float_to_bf16(x[i]);
    fp16[i] = float_to_fp16(x[i]);
    e4m3[i] = float_to_e4m3(x[i]);
    if (i % 16 == 0) {
        vstore16(float16_to_bf16(vload16(0, x + i)), 0, bf16v + i);
        vstore16(float16_to_e4m3(vload16(0, x + i)), 0, e4m3v + i);
    }
}

__kernel void decode(__global const ushort* h, __global const uchar* c, __global float* bf16, __global float* bf16v,
                     __global float* fp16, __global float* fp16v, __global float* e4m3, __global float* e4m3v) {
    const int i = get_global_id(0);
    bf16[i] = bf16_to_float(h[i]);
    fp16[i] = fp16_to_float(h[i]);
    e4m3[i] = e4m3_to_float(c[i]);
    if (i % 16 == 0) {
        vstore16(bf16x16_to_float(vload16(0, h + i)), 0, bf16v + i);
        vstore16(fp16x16_to_float(vload16(0, h + i)), 0, fp16v + i);
        vstore16(e4m3x16_to_float(vload16(0, c + i)), 0, e4m3v + i);
    }
}
"""

EDGES = [
    0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan,
    448.0, 449.0, 463.99, 464.0, 480.0, 1e6, 3.4e38, -448.0, -500.0,  # e4m3 saturation
    2.0**-6, 2.0**-7, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-11, 1e-30,  # e4m3 subnormals and ties
    65504.0, 65519.0, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-26,  # fp16
    1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-9, 2.0**-133, 1e-45,  # bf16 ties, fp32 subnormals
]


def _run(kernel: str, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
    rt = runtime()
    program = build(rt, "numeric_test", CONVERSIONS_SOURCE)
    flags = cl.mem_flags
    buffers = [cl.Buffer(rt.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=x) for x in inputs]
    buffers += [cl.Buffer(rt.context, flags.WRITE_ONLY, size=y.nbytes) for y in outputs]
    program.launch(kernel, (inputs[0].size,), None, *buffers)
    for y, buffer in zip(outputs, buffers[len(inputs):]):
        cl.enqueue_copy(rt.queue, y, buffer)
    rt.queue.finish()


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().view(np.uint8 if t.element_size() == 1 else np.uint16)


def _floats() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    pieces = [
        torch.tensor(EDGES, dtype=torch.float32),
        torch.randint(-(2**31), 2**31, (1 << 18,), generator=generator, dtype=torch.int64).to(torch.int32).view(torch.float32),
        torch.randn(1 << 16, generator=generator) * 300,  # the e4m3 range
        torch.randn(1 << 16, generator=generator) * 1e-3,
        torch.randn(1 << 16, generator=generator) * 1e4,
    ]
    x = torch.cat(pieces)
    return torch.cat([x, torch.zeros(-x.numel() % 16)])


def test_encodes_round_to_nearest_even_exactly_as_torch():
    x = _floats()
    n = x.numel()
    bf16, bf16v, fp16 = (np.zeros(n, np.uint16) for _ in range(3))
    e4m3, e4m3v = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    _run("encode", [x.numpy()], [bf16, bf16v, fp16, e4m3, e4m3v])
    nan = torch.isnan(x).numpy()
    for got, dtype in ((bf16, torch.bfloat16), (bf16v, torch.bfloat16), (fp16, torch.float16)):
        want = x.to(dtype)
        # NaN payloads differ between torch's own code paths; any NaN is a NaN.
        assert np.array_equal(got[~nan], _bits(want)[~nan]), f"{dtype} encode differs from torch"
        assert torch.isnan(torch.from_numpy(got[nan].view(np.int16)).view(dtype)).all()
    want = _bits(x.to(torch.float8_e4m3fn))
    assert np.array_equal(e4m3, want), "e4m3fn encode (saturation and NaN sign included) differs from torch"
    assert np.array_equal(e4m3v, want), "16-lane e4m3fn encode differs from torch"


def test_decodes_every_e4m3_code_and_16_bit_patterns_exactly():
    codes = np.arange(65536, dtype=np.uint16)
    bytes_ = (codes & 0xFF).astype(np.uint8)  # all 256 e4m3fn codes, 256 times over
    outputs = [np.zeros(65536, np.float32) for _ in range(6)]
    _run("decode", [codes, bytes_], outputs)
    bf16, bf16v, fp16, fp16v, e4m3, e4m3v = (torch.from_numpy(o) for o in outputs)
    raw = torch.from_numpy(codes.view(np.int16))
    for got, want in (
        (bf16, raw.view(torch.bfloat16).float()), (bf16v, raw.view(torch.bfloat16).float()),
        (fp16, raw.view(torch.float16).float()), (fp16v, raw.view(torch.float16).float()),
        (e4m3, torch.from_numpy(bytes_).view(torch.float8_e4m3fn).float()),
        (e4m3v, torch.from_numpy(bytes_).view(torch.float8_e4m3fn).float()),
    ):
        both_nan = torch.isnan(got) & torch.isnan(want)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got[~both_nan].view(torch.int32), want[~both_nan].view(torch.int32))
