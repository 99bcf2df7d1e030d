"""Argument checks shared by the Buffer operations (run locally, before the ranks agree)."""

from __future__ import annotations

import torch

from hal.checks import FP8, expect_in_range, expect_int, expect_tensor, value_checks_enabled
from hal.ep.agreement import DTYPE_CODES
from hal.ep.comm import Communicator
from hal.ep.handle import DispatchHandle, LowLatencyHandle
from hal.errors import DeviceError, DTypeError, ShapeError, ValueRangeError

__all__ = ["TOKEN_DTYPES", "DISPATCH_DTYPES", "ONE_BYTE_DTYPES", "check_device", "check_tokens", "check_experts", "check_topk", "check_weights", "check_handle"]

TOKEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what combine reduces
DISPATCH_DTYPES = tuple(DTYPE_CODES)  # what dispatch moves (as bytes, as DeepEP's kernels: the usual dtypes)
ONE_BYTE_DTYPES = (FP8, torch.float8_e5m2, torch.uint8, torch.int8)  # tokens that travel with scales


def check_device(op: str, name: str, tensor: torch.Tensor, comm: Communicator) -> None:
    """Tensors must live where the group communicates: CUDA for NCCL, the CPU for gloo."""
    if tensor.device.type != comm.device.type:
        raise DeviceError(
            op, name, f"a tensor on {comm.device.type} (the group's backend communicates {comm.device.type} tensors)",
            f"a tensor on {tensor.device}", f"Move '{name}' to {comm.device.type}, or use a process group of the tensors' device.",
        )


def check_tokens(op: str, x: object, comm: Communicator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` is tokens [N, hidden] of the dtypes DeepEP's dispatch moves (:data:`DISPATCH_DTYPES`), or
    the pair (1-byte tokens [N, hidden]: float8 e4m3fn/e5m2, uint8, int8; scales [N, num_scales]
    float32 or int32, any strides): DeepEP's kernels hand the scales over as they came, so any
    number per token is taken (float32 per 128 channels, four UE8M0 exponents per int32, one per
    token, one per 32 channels)."""
    if isinstance(x, (tuple, list)) and len(x) == 2 and x[1] is None:  # DeepEP's (x, None): no scales
        x = x[0]
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise DTypeError(op, "x", "a tensor or a pair (fp8 tensor, scales)", f"a sequence of {len(x)}", "Pass x or (x_fp8, x_scales).")
        data, scales = x
        expect_tensor(op, "x[0]", data, dtypes=ONE_BYTE_DTYPES, shape=(None, None), dims=("num_tokens", "hidden"))
        expect_tensor(op, "x[1]", scales, dtypes=(torch.float32, torch.int32), shape=(data.shape[0], None), dims=("num_tokens", "num_scales"))
        if scales.shape[1] == 0 or scales.shape[1] >= 1 << 20:
            raise ShapeError(op, "x[1]", "1 to 2**20 - 1 scales per token", f"{scales.shape[1]}", "Pass the tokens without scales, or their scales.")
        check_device(op, "x[0]", data, comm)
        check_device(op, "x[1]", scales, comm)
        return data, scales
    expect_tensor(op, "x", x, dtypes=DISPATCH_DTYPES, shape=(None, None), dims=("num_tokens", "hidden"))
    assert isinstance(x, torch.Tensor)
    check_device(op, "x", x, comm)
    return x, None


def check_experts(op: str, num_experts: int, comm: Communicator) -> int:
    """Experts are split evenly over ranks; returns the number of local experts."""
    expect_int(op, "num_experts", num_experts, minimum=1)
    if num_experts % comm.world:
        raise ValueRangeError(
            op, "num_experts", f"a multiple of the group size {comm.world}", str(num_experts), "Experts are split evenly over ranks.",
        )
    return num_experts // comm.world


def check_topk(op: str, topk_idx: object, num_tokens: int, num_experts: int, comm: Communicator) -> torch.Tensor:
    """int64 [num_tokens, num_topk], ids in [-1, num_experts), no expert twice on a row."""
    expect_tensor(op, "topk_idx", topk_idx, dtypes=torch.int64, shape=(num_tokens, None), dims=("num_tokens", "num_topk"))
    assert isinstance(topk_idx, torch.Tensor)
    check_device(op, "topk_idx", topk_idx, comm)
    # Dispatch reads its counts on the host anyway: these checks cost no extra stall on a GPU.
    expect_in_range(
        op, "topk_idx", topk_idx, -1, num_experts, what=f"expert ids (-1 for none; num_experts={num_experts})",
        fix="Route only to existing experts, or -1 for an unused slot.", synchronised=True,
    )
    if value_checks_enabled(topk_idx, synchronised=True) and topk_idx.shape[1] > 1:
        ordered = topk_idx.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            token, slot = (int(i) for i in repeated.nonzero()[0])
            raise ValueRangeError(
                op, "topk_idx", "distinct experts on each token's row (or -1)",
                f"expert {int(ordered[token, slot + 1])} twice on row {token}", "Select each expert at most once per token (topk gives distinct ids).",
            )
    return topk_idx


def check_weights(op: str, topk_weights: object, topk_idx: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """float32, the shape of topk_idx."""
    expect_tensor(op, "topk_weights", topk_weights, dtypes=torch.float32, shape=tuple(topk_idx.shape), dims=("num_tokens", "num_topk"))
    assert isinstance(topk_weights, torch.Tensor)
    check_device(op, "topk_weights", topk_weights, comm)
    return topk_weights


def check_handle(op: str, handle: object, kind: type, comm: Communicator) -> None:
    """A handle of the right kind, made by this Buffer."""
    maker = {DispatchHandle: "Buffer.dispatch", LowLatencyHandle: "Buffer.low_latency_dispatch"}[kind]
    if not isinstance(handle, kind):
        raise DTypeError(op, "handle", f"the {kind.__name__} returned by {maker}", type(handle).__name__, f"Pass the handle {maker} returned.")
    if handle.owner != comm.owner:
        raise ValueRangeError(
            op, "handle", "a handle made by this Buffer", f"a handle of another Buffer (#{handle.owner}, this is #{comm.owner})",
            "Combine on the Buffer that dispatched.",
        )
