"""DeepEP's ``Config`` and its buffer-size arithmetic, so engine code that sizes buffers ports.

DeepEP's NVLink/RDMA kernels split tokens into chunks per channel (two SMs each); a Config says
how many SMs and how large the chunks are, and its size hints say how many bytes the buffers then
need. The torch.distributed transport allocates per call and runs no such kernels: a Config is
validated (DeepEP's own rules) and recorded, and tunes nothing. The arithmetic below follows
DeepEP's ``csrc/legacy/config.hpp`` (8 NVLink peers per node, 128-byte alignment, int64 top-k
ids, an 8-byte source record per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from hal.errors import ValueRangeError

__all__ = ["Config", "NUM_MAX_NVL_PEERS", "low_latency_rdma_size_hint", "dispatch_config", "combine_config"]

NUM_MAX_NVL_PEERS = 8
ALIGNMENT = 128
_MAX_TOPK = 128
_MAX_SCALES = 128
_TOPK_IDX_BYTES = 8
_SOURCE_META_BYTES = 8


def _align(x: int, y: int) -> int:
    return -(-x // y) * y


@dataclass(frozen=True)
class Config:
    """``Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)``: SMs and chunk sizes in tokens.

    ``num_max_rdma_chunked_recv_tokens`` is rounded up to a multiple of the send chunk, as DeepEP does.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueRangeError:
            return ValueRangeError("Config", name, expected, str(getattr(self, name)), "Use DeepEP's recommended configs (Buffer.get_dispatch_config).")

        if self.num_sms < 0:
            raise bad("num_sms", "a count >= 0")
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise bad("num_max_nvl_chunked_send_tokens", f"in (0, num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens})")
        send = self.num_max_rdma_chunked_send_tokens
        if send <= 0 or self.num_max_rdma_chunked_recv_tokens <= 0:
            raise bad("num_max_rdma_chunked_send_tokens", "positive chunk sizes")
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", _align(self.num_max_rdma_chunked_recv_tokens, send))
        if send > self.num_max_rdma_chunked_recv_tokens // 2:
            raise bad("num_max_rdma_chunked_send_tokens", f"at most half of num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens}")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of the NVLink buffer DeepEP's intranode/internode kernels need for ``hidden_bytes`` per token."""
        if not (num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0):
            raise ValueRangeError("Config.get_nvl_buffer_size_hint", "num_ranks", f"below {NUM_MAX_NVL_PEERS} or a multiple of it", str(num_ranks), "")
        rdma_ranks, nvl_ranks, channels = max(num_ranks // NUM_MAX_NVL_PEERS, 1), min(num_ranks, NUM_MAX_NVL_PEERS), self.num_sms // 2
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (_TOPK_IDX_BYTES + 4) + _MAX_SCALES * 4
        total = channels * nvl_ranks * (2 * rdma_ranks + 3) * 4 + channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens * per_token
        return _align(total, ALIGNMENT)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of the RDMA buffer (0 within one node of up to 8 ranks)."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        if num_ranks % NUM_MAX_NVL_PEERS:
            raise ValueRangeError("Config.get_rdma_buffer_size_hint", "num_ranks", f"a multiple of {NUM_MAX_NVL_PEERS}", str(num_ranks), "")
        rdma_ranks, channels = num_ranks // NUM_MAX_NVL_PEERS, self.num_sms // 2
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (_TOPK_IDX_BYTES + 4) + _MAX_SCALES * 4 + 16
        total = channels * rdma_ranks * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4 + channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens * per_token * 2
        return _align(total, ALIGNMENT)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """DeepEP's low-latency buffer size: double-buffered send, receive and signalling areas (bf16 sizing)."""
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(num_max_dispatch_tokens_per_rank * dispatch_msg, num_experts * num_max_dispatch_tokens_per_rank * combine_msg)
    recv = num_experts * num_max_dispatch_tokens_per_rank * max(dispatch_msg, combine_msg)
    signals = _align(num_experts * 4, ALIGNMENT)
    total = 2 * (send + recv + signals)
    return (total + ALIGNMENT) // ALIGNMENT * ALIGNMENT


# DeepEP's recommended configs per rank count (its table), with the Buffer's current SM count.
_DISPATCH = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128), 24: (32, 288, 8, 128),
             32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128), 96: (20, 480, 12, 128), 128: (20, 560, 12, 128),
             144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128), 24: (1, 288, 8, 128),
            32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128), 96: (1, 480, 8, 128), 128: (1, 560, 8, 128),
            144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def _lookup(table: dict[int, tuple[int, int, int, int]], num_ranks: int, num_sms: int, what: str) -> Config:
    if num_ranks not in table:
        raise ValueRangeError(f"Buffer.get_{what}_config", "num_ranks", "one of " + ", ".join(map(str, table)), str(num_ranks),
                              "DeepEP ships configs for these group sizes; build a Config yourself for others.")
    return Config(num_sms, *table[num_ranks])


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return _lookup(_DISPATCH, num_ranks, num_sms, "dispatch")


def combine_config(num_ranks: int, num_sms: int) -> Config:
    return _lookup(_COMBINE, num_ranks, num_sms, "combine")
