"""Agreement before payloads: every rank learns whether every rank can go on, then all act alike.

Each Buffer operation first validates its arguments and prepares its send buffer locally,
catching any error, then all ranks exchange a fixed-size header (:data:`HEADER_FIELDS` plus one
slot per fact in :data:`FACTS` and :data:`SHARED`): the operation, its number, whether the rank
failed, and the facts all ranks must share (hidden size, dtype, top-k width, expert count, the
handle's dispatch...). From the same table every rank takes the same decision:

1. operations or their numbers differ: :class:`~hal.ep.errors.EPMismatchError` everywhere;
2. a rank failed: the failing ranks' errors are exchanged (JSON, no pickle); each failing rank
   re-raises its own error, the others raise the same :mod:`hal.errors` type naming the rank;
3. a fact differs between ranks: the matching argument error, worded identically everywhere.

Only then does the operation move payloads, so bad input never leaves a peer waiting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from hal import errors as hal_errors
from hal.ep.comm import Communicator
from hal.ep.errors import EPError, EPMismatchError
from hal.errors import ArgumentError, DTypeError, ShapeError, ValueRangeError

__all__ = ["OPERATIONS", "FACTS", "SHARED", "DTYPE_CODES", "Agreed", "agree"]

T = TypeVar("T")

OPERATIONS = {
    "Buffer.get_dispatch_layout": 1,
    "Buffer.dispatch": 2,
    "Buffer.dispatch (cached)": 3,
    "Buffer.combine": 4,
    "Buffer.low_latency_dispatch": 5,
    "Buffer.low_latency_combine": 6,
}
MAGIC = 0x48414C45  # "HALE": a header of this protocol, not some other all_gather of this size
HEADER_FIELDS = ("magic", "operation", "number", "failed")
MISSING = -1

# The dtypes tokens may have (DeepEP's dispatch takes any: it moves bytes), as numbers a header can carry.
DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4, torch.float8_e5m2: 5, torch.uint8: 6, torch.int8: 7,
               torch.int16: 8, torch.int32: 9, torch.int64: 10, torch.float64: 11}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Fact:
    """A value every rank must pass alike, and how a disagreement is reported.

    Attributes:
        argument: the argument it comes from.
        error: the :mod:`hal.errors` type raised when ranks disagree.
        expected: what the contract requires, in words.
        show: how one rank's value reads in the message.
    """

    argument: str
    error: type[ArgumentError]
    expected: str
    show: Callable[[int], str] = str


def _given(value: int) -> str:
    return "given" if value else "None"


FACTS: dict[str, Fact] = {
    "hidden": Fact("x", ShapeError, "the same hidden size on every rank", lambda v: f"hidden {v}"),
    "dtype": Fact("x", DTypeError, "the same token dtype on every rank", lambda v: _DTYPE_NAMES.get(v, str(v))),
    "with_topk": Fact("topk_idx", DTypeError, "topk_idx given on every rank or on none", _given),
    "num_topk": Fact("topk_idx", ShapeError, "the same num_topk on every rank", lambda v: f"num_topk {v}"),
    "with_weights": Fact("topk_weights", DTypeError, "topk_weights given on every rank or on none", _given),
    "num_experts": Fact("num_experts", ValueRangeError, "the same num_experts on every rank", str),
    "dispatch": Fact("handle", ValueRangeError, "every rank's handle from the same dispatch", lambda v: f"the handle of operation #{v}"),
    "max_tokens": Fact("num_max_dispatch_tokens_per_rank", ValueRangeError, "the same num_max_dispatch_tokens_per_rank on every rank", str),
    "use_fp8": Fact("use_fp8", ValueRangeError, "the same use_fp8 on every rank", lambda v: str(bool(v))),
    "scales": Fact("x", DTypeError, "the same scale form (dtype and scales per token) on every rank", lambda v: describe_scales(v)),
}


def scale_form(scales: torch.Tensor | None) -> int:
    """The "scales" fact: 0 without scales, else the scales' dtype code and columns per token
    (float32 per 128 channels, packed int32 UE8M0, one per token, ...: DeepEP's kernels take any)."""
    return 0 if scales is None else (DTYPE_CODES[scales.dtype] << 20) | scales.shape[1]


def describe_scales(form: int) -> str:
    """:func:`scale_form` in words."""
    if form == 0:
        return "no scales"
    return f"{_DTYPE_NAMES.get(form >> 20, f'dtype #{form >> 20}')} scales, {form & 0xFFFFF} per token"
# Facts each rank announces without having to share them (read with Agreed.shared).
SHARED = ("num_worst_tokens",)
_COLUMNS = HEADER_FIELDS + tuple(FACTS) + SHARED


@dataclass(frozen=True)
class Agreed(Generic[T]):
    """The local plan of an operation every rank agreed to run, and everyone's header."""

    plan: T
    number: int  # the operation's number, the same on every rank (handles record it)
    headers: torch.Tensor  # int64 [R, len(_COLUMNS)]

    def shared(self, name: str) -> list[int]:
        return self.headers[:, _COLUMNS.index(name)].tolist()


def agree(comm: Communicator, op: str, prepare: Callable[[], tuple[dict[str, int], T]]) -> Agreed[T]:
    """Run ``prepare`` (local checks and packing, returning ``(facts, plan)``), then agree.

    Raises, identically on every rank, as described in the module docstring.
    """
    number = comm.begin(op)
    error: Exception | None = None
    facts: dict[str, int] = {}
    plan: T | None = None
    try:
        facts, plan = prepare()
    except Exception as exc:  # reported to every peer below, then re-raised here
        error = exc
    row = [MAGIC, OPERATIONS[op], number, int(error is not None)] + [int(facts.get(name, MISSING)) for name in _COLUMNS[len(HEADER_FIELDS):]]
    headers = comm.all_gather_ints(row, "header")
    _check_step(op, headers)
    failed = [r for r in range(comm.world) if headers[r, HEADER_FIELDS.index("failed")]]
    if failed:
        reports = comm.all_gather_bytes(_report(error) if error is not None else b"", "error report")
        if error is not None:
            raise error
        raise _rebuild(op, failed, reports)
    _check_facts(op, headers)
    assert plan is not None  # prepare returned, on this rank as on every other
    return Agreed(plan, number, headers)


def _check_step(op: str, headers: torch.Tensor) -> None:
    names = {code: name for name, code in OPERATIONS.items()}
    steps = [(names.get(int(h[1]), f"an unknown operation ({int(h[1])})"), int(h[2])) for h in headers]
    if any(int(h[0]) != MAGIC for h in headers) or len(set(steps)) > 1:
        listing = "; ".join(f"rank {r}: {name} #{number}" for r, (name, number) in enumerate(steps))
        raise EPMismatchError(
            f"{op}: the ranks are not running the same Buffer operation ({listing}). Every rank of the group must "
            "call the same Buffer methods in the same order."
        )


def _check_facts(op: str, headers: torch.Tensor) -> None:
    for column, fact in enumerate(FACTS.values(), start=len(HEADER_FIELDS)):
        values = headers[:, column].tolist()
        if len(set(values)) > 1:
            by_value: dict[int, list[int]] = {}
            for rank, value in enumerate(values):
                by_value.setdefault(value, []).append(rank)
            actual = ", ".join(f"{fact.show(v)} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for v, r in by_value.items())
            raise fact.error(op, fact.argument, fact.expected, actual, "Every rank of the group must call the Buffer with matching arguments.")


def _report(error: Exception) -> bytes:
    report: dict[str, object] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, ArgumentError):
        report["fields"] = [error.op, error.argument, error.expected, error.actual, error.fix]
    return json.dumps(report).encode()


def _rebuild(op: str, failed: list[int], reports: list[bytes]) -> Exception:
    """The error a rank that did not fail raises: the first failing rank's, naming that rank."""
    rank = failed[0]
    report = json.loads(reports[rank].decode())
    others = f" (ranks {', '.join(map(str, failed))} failed)" if len(failed) > 1 else ""
    kind = getattr(hal_errors, report["type"], None)
    if "fields" in report and isinstance(kind, type) and issubclass(kind, ArgumentError):
        origin_op, argument, expected, actual, fix = report["fields"]
        return kind(f"{origin_op} on rank {rank}{others}", argument, expected, actual, fix)
    return EPError(f"{op}: rank {rank} failed before exchanging tokens{others}: {report['type']}: {report['message']}")
