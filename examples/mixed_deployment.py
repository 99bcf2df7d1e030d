"""One application, a different backend per operator, checked against the reference.

Run it with per-operator selection, for example::

    HAL_BACKEND_MLA_DECODE=numpy HAL_BACKEND_PER_TOKEN_CAST_TO_FP8=numpy HAL_BACKEND=reference \\
        python examples/mixed_deployment.py

It runs one decode step of a small DeepSeek-style layer (MLA attention over a paged cache, an FP8
output projection, routing counts for expert parallelism) with whatever the environment selects,
prints which backend ran each operator, then recomputes the step on the reference backend and
exits non-zero if any output is out of the conformance tolerance.
"""

from __future__ import annotations

import sys

import torch

import hal
from hal.conformance.metrics import cos_diff

OPERATORS = ("mla_decode", "per_token_cast_to_fp8", "gemm_fp8_nt", "ep_dispatch_layout")


def decode_step(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seqlens = inputs["seqlens"]
    metadata, splits = hal.get_mla_metadata(seqlens, 16, 1)
    attn, lse = hal.flash_mla_with_kvcache(inputs["q"], inputs["k_cache"], inputs["block_table"], seqlens, 512, metadata, splits, causal=True)
    hidden = attn.reshape(-1, 512)
    projected = torch.empty(hidden.shape[0], 256, dtype=torch.bfloat16)
    hal.gemm_fp8_fp8_bf16_nt(hal.per_token_cast_to_fp8(hidden), inputs["w_o"], projected)
    per_rank, _, per_expert, in_rank = hal.get_dispatch_layout(inputs["topk_idx"], 16, 4)
    return {"attn": attn, "lse": lse, "projected": projected, "per_rank": per_rank, "per_expert": per_expert, "in_rank": in_rank}


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "q": torch.randn(3, 1, 16, 576, generator=g).bfloat16(),
        "k_cache": torch.randn(9, 64, 1, 576, generator=g).bfloat16(),
        "block_table": torch.tensor([[4, 1, 0], [2, 8, 5], [7, 3, 6]], dtype=torch.int32),
        "seqlens": torch.tensor([150, 65, 190], dtype=torch.int32),
        "w_o": hal.per_block_cast_to_fp8(torch.randn(256, 512, generator=g)),
        "topk_idx": torch.randint(0, 16, (48, 2), generator=g),
    }


def main() -> int:
    inputs = make_inputs()
    for op in OPERATORS:
        chosen = hal.select(op, "cpu")
        print(f"{op:24s} -> {chosen.backend.name:10s} ({chosen.reason})")
    got = decode_step(inputs)
    with hal.use_backend("reference"):
        expected = decode_step(inputs)
    failures = []
    for name, value in expected.items():
        if value.is_floating_point():
            diff = cos_diff(got[name].float(), value.float())
            ok = diff < 1e-5
        else:
            diff = float((got[name] != value).sum())
            ok = diff == 0
        print(f"{name:12s} {'ok' if ok else 'MISMATCH'} ({diff:.3g})")
        if not ok:
            failures.append(name)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
