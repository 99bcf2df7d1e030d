"""Messages: each token travels as one byte row holding all of its fields side by side.

DeepEP's low-latency kernels send one message per token ("index at source (int), 3 reserved
int fields, hidden data, FP8 scales": ``csrc/kernels/internode_ll.cu``). Framing the fields
the same way here means one collective per exchange whatever the payload (bf16, or fp8 with
scales, plus routing metadata), and byte rows that gloo and NCCL both move (gloo has no
float8). A :class:`Frame` states the fields; :meth:`Frame.pack` writes rows,
:meth:`Frame.unpack` reads them back as contiguous tensors.

A message is padded to a multiple of 16 bytes (DeepEP's messages are int4-vectorised too) and
handled as int64 words: the gathers and scatters of ``ep_pack``/``ep_unpack`` then move eight
bytes per element, several times faster than byte rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["Field", "Frame", "WORD"]

WORD = torch.int64
_ALIGN = 16


@dataclass(frozen=True)
class Field:
    """One field of a message: its name, dtype and per-token shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Frame:
    """The byte layout of a message: fields in the order given, then padding to 16 bytes.

    Attributes:
        fields: the fields.
        width: bytes per message (a multiple of 16).
    """

    def __init__(self, *fields: Field) -> None:
        self.fields = fields
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for field in fields:
            self._offsets[field.name] = (offset, offset + field.nbytes)
            offset += field.nbytes
        self.width = max(-(-offset // _ALIGN) * _ALIGN, _ALIGN)

    def pack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Messages as int64 words [N, width / 8] from each field's tensor ``[N, *field.shape]`` (any strides)."""
        num_rows = next(iter(tensors.values())).shape[0]
        device = next(iter(tensors.values())).device
        rows = torch.zeros(num_rows, self.width, dtype=torch.uint8, device=device)
        for field in self.fields:
            begin, end = self._offsets[field.name]
            rows[:, begin:end] = tensors[field.name].reshape(num_rows, math.prod(field.shape)).contiguous().view(torch.uint8)
        return rows.view(WORD)

    def unpack(self, words: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field of messages ``[..., width / 8]`` (int64 words) as a contiguous tensor ``[..., *field.shape]``."""
        rows = words.view(torch.uint8)
        lead = tuple(rows.shape[:-1])
        out = {}
        for field in self.fields:
            begin, end = self._offsets[field.name]
            out[field.name] = rows[..., begin:end].contiguous().view(field.dtype).view(lead + field.shape)
        return out
