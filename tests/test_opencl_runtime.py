"""The OpenCL backend's runtime: device selection, program cache, build and launch errors, buffers, availability."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("pyopencl")
from hal.backends.opencl.device import list_devices  # noqa: E402

if not list_devices():
    pytest.skip("no OpenCL device", allow_module_level=True)

import numpy as np  # noqa: E402

import hal  # noqa: E402
from hal.canary import ENV_PROVING  # noqa: E402
from hal.backends.opencl import plugin  # noqa: E402
from hal.backends.opencl.buffers import bind  # noqa: E402
from hal.backends.opencl.device import ENV_DEVICE, describe, runtime  # noqa: E402
from hal.backends.opencl.errors import OpenCLBuildError, OpenCLDeviceNotFoundError, OpenCLLaunchError  # noqa: E402
from hal.backends.opencl.program import build  # noqa: E402

COPY_SOURCE = "__kernel void copy_ints(__global const int* src, __global int* dst) { dst[get_global_id(0)] = src[get_global_id(0)] + 1; }"


@pytest.fixture(autouse=True)
def no_device_variables(monkeypatch):
    monkeypatch.delenv(ENV_DEVICE, raising=False)
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)


def _first_device():
    return list_devices()[0]


def test_default_is_the_first_device_and_one_runtime_per_selection():
    index, device = _first_device()
    assert runtime().device == device
    assert runtime() is runtime(), "the context and queue are opened once"
    assert runtime().name == describe(device)


@pytest.mark.parametrize("how", ["index", "name"])
def test_hal_opencl_device_selects_by_index_or_name(monkeypatch, how):
    index, device = _first_device()
    monkeypatch.setenv(ENV_DEVICE, index if how == "index" else device.name.strip()[-8:].upper())
    assert runtime().device == device


def test_pyopencl_ctx_convention_is_honoured(monkeypatch):
    index, device = _first_device()
    monkeypatch.setenv("PYOPENCL_CTX", index)
    assert runtime().device == device


def test_unknown_device_is_a_clear_error_listing_the_devices(monkeypatch):
    monkeypatch.setenv(ENV_DEVICE, "no-such-accelerator")
    with pytest.raises(OpenCLDeviceNotFoundError, match="HAL_OPENCL_DEVICE='no-such-accelerator' matches no OpenCL device") as err:
        runtime()
    assert _first_device()[0] in str(err.value) and isinstance(err.value, hal.HalError)
    availability = hal.get_backend("opencl").availability()  # through the canary child
    assert not availability.available and "no-such-accelerator" in availability.reason


@pytest.fixture
def in_canary_child(monkeypatch):
    """The in-process probe as the canary child runs it: the only place it opens the device."""
    monkeypatch.setenv(ENV_PROVING, "opencl")


def test_the_parent_process_never_opens_the_runtime_to_probe(monkeypatch):
    import hal.backends.opencl.device as device_module

    def must_not_open():
        raise AssertionError("the runtime was opened outside the canary")

    monkeypatch.setattr(device_module, "runtime", must_not_open)
    assert plugin.hal_backend_availability().available


def test_availability_names_the_device_or_says_what_is_missing(monkeypatch, in_canary_child):
    available = plugin.hal_backend_availability()
    assert available.available and available.device == runtime().name
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "pyopencl" else real_find_spec(name, *args))
    missing = plugin.hal_backend_availability()
    assert not missing.available and "pip install 'unihal[opencl]'" in missing.reason


def test_availability_never_raises(monkeypatch, in_canary_child):
    import hal.backends.opencl.device as device_module

    def broken_driver():
        raise RuntimeError("ICD loader exploded")

    monkeypatch.setattr(device_module, "runtime", broken_driver)
    availability = plugin.hal_backend_availability()
    assert not availability.available and "ICD loader exploded" in availability.reason


def test_programs_are_built_once_per_device_source_and_options():
    rt = runtime()
    first = build(rt, "copy", COPY_SOURCE)
    assert build(rt, "copy", COPY_SOURCE) is first
    assert build(rt, "copy", COPY_SOURCE, {"UNUSED": 1}) is not first


def test_broken_kernel_raises_with_program_device_and_build_log():
    rt = runtime()
    source = "__kernel void broken_kernel(__global int* x) { x[0] = undeclared_identifier; }"
    with pytest.raises(OpenCLBuildError) as err:
        build(rt, "broken_family", source)
    message = str(err.value)
    assert "broken_family" in message and rt.name in message
    assert "undeclared_identifier" in err.value.log and "undeclared_identifier" in message
    assert isinstance(err.value, hal.HalError)


def test_failed_launch_names_the_kernel_and_device():
    rt = runtime()
    program = build(rt, "copy", COPY_SOURCE)
    src = torch.arange(8, dtype=torch.int32)
    with pytest.raises(OpenCLLaunchError, match=r"'copy\.copy_ints' failed on") as err:
        with bind(rt, "copy") as io:
            # 8 work-items cannot be cut into work-groups of 3: the enqueue fails.
            program.launch("copy_ints", (8,), (3,), io.input(src), io.output(torch.empty(8, dtype=torch.int32)))
    assert rt.name in str(err.value)


def test_inputs_that_are_unaligned_views_are_read_correctly():
    rt = runtime()
    program = build(rt, "copy", COPY_SOURCE)
    storage = torch.arange(17, dtype=torch.int32)
    view = storage[1:]  # 4 bytes past an aligned allocation
    out = torch.zeros(16, dtype=torch.int32)
    with bind(rt, "copy") as io:
        program.launch("copy_ints", (16,), None, io.input(view), io.output(out))
    assert torch.equal(out, view + 1)
    assert np.array_equal(storage.numpy()[1:], np.arange(1, 17)), "inputs are never written"
