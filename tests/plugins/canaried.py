"""A test backend proven by a canary; what its operator does is chosen by HAL_TEST_CANARY_MODE.

``correct``: the reference per-token cast; ``wrong``: one element off; ``abort``: the process
aborts (as a runtime's LLVM does); ``hang``: never returns. Availability is always True in
process: only the canary can tell these apart.
"""

import os
import time

from hal.ops.fp8_quant import per_token_cast_reference
from hal.plugin import Availability, BackendInfo, hookimpl

CALLS = []


@hookimpl
def hal_backend_info():
    return BackendInfo(description="canary-proven test backend", priority=900, device_types=("cpu",))


@hookimpl
def hal_backend_availability():
    return Availability(True, device="test device")


@hookimpl
def hal_backend_canary_key():
    return "mode=" + os.environ.get("HAL_TEST_CANARY_MODE", "correct")


@hookimpl
def hal_per_token_cast_to_fp8(x):
    mode = os.environ.get("HAL_TEST_CANARY_MODE", "correct")
    CALLS.append(mode)
    if mode == "abort":
        os.abort()
    if mode == "hang":
        time.sleep(3600)
    values, scales = per_token_cast_reference(x)
    if mode == "wrong":
        scales = scales.clone()
        scales[-1, -1] *= 2
    return values, scales
