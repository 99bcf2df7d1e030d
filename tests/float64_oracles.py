"""The non-finite mutations the MLA contract is tested with, judged by the float64 oracle of
hal.conformance.oracles. Imported by tests in this folder and in tests/interpreter (the Triton kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import hal
from hal.conformance.oracles import mla_oracle

PAGE = 64


def mla_case(seqlens: list[int], s_q: int, h_q: int, causal: bool, seed: int, dtype=torch.bfloat16, device="cpu"):
    """Random paged MLA inputs; unused cache slots and the spare blocks hold NaN (they must never leak)."""
    generator = torch.Generator().manual_seed(seed)
    pages = [-(-s // PAGE) for s in seqlens]
    blocks = sum(pages) + 2
    q = torch.randn(len(seqlens), s_q, h_q, 576, generator=generator).to(dtype)
    k = torch.randn(blocks, PAGE, 1, 576, generator=generator).to(dtype)
    table = torch.full((len(seqlens), max(max(pages), 1)), blocks - 1, dtype=torch.int32)
    k[blocks - 2:] = float("nan")
    used = 0
    for b, (length, p) in enumerate(zip(seqlens, pages)):
        table[b, :p] = torch.arange(used, used + p)
        used += p
        if length % PAGE:
            k[int(table[b, p - 1]), length % PAGE:] = float("nan")  # past the sequence's end
    return {"q": q.to(device), "k": k.to(device), "table": table.to(device), "seqlens": torch.tensor(seqlens, dtype=torch.int32, device=device), "causal": causal}


def run_mla(backend: str, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    metadata, splits = hal.get_mla_metadata(case["seqlens"], case["q"].shape[1] * case["q"].shape[2], 1)
    with hal.use_backend(backend):
        return hal.flash_mla_with_kvcache(case["q"], case["k"], case["table"], case["seqlens"], 512, metadata, splits, causal=case["causal"])


def nonfinite_pattern(x: torch.Tensor) -> torch.Tensor:
    """0 finite, 2 NaN, +3 / -3 for +inf / -inf: what must match position by position."""
    x = x.double().cpu()
    return torch.where(torch.isnan(x), 2.0, torch.where(torch.isinf(x), 3.0 * torch.sign(x), 0.0)).to(torch.int8)


def _last_used(case, b):
    n = int(case["seqlens"][b])
    return int(case["table"][b, (n - 1) // PAGE]), (n - 1) % PAGE


MUTATIONS: dict[str, Callable[[dict], None]] = {
    "none": lambda c: None,
    "nan in q nope": lambda c: c["q"].__setitem__((0, 0, 3, 10), float("nan")),
    "inf in q rope": lambda c: c["q"].__setitem__((0, -1, 1, 520), float("inf")),
    "-inf in q rope": lambda c: c["q"].__setitem__((1, 0, 2, 570), float("-inf")),
    "nan in a used key": lambda c: c["k"].__setitem__((int(c["table"][1, 0]), 0, 0, 100), float("nan")),
    "inf in a used value channel": lambda c: c["k"].__setitem__((int(c["table"][1, 0]), 0, 0, 3), float("inf")),
    "nan in a sequence's last key": lambda c: c["k"].__setitem__((*_last_used(c, 1), 0, 7), float("nan")),
}

SHAPES = [
    ([70, 130, 0], 2, True),  # an empty sequence
    ([300, 1, 65], 1, False),
    ([1, 200], 2, True),  # a causal sequence shorter than s_q: query 0 sees no key
    ([700, 129], 2, True),  # long enough to be split
]


def mla_nonfinite_mismatches(backend: str, seeds=range(2)) -> list[str]:
    """Every (shape, mutation, seed) where ``backend`` disagrees with the float64 oracle about
    which outputs are NaN or inf, or about the finite values beyond the conformance bounds."""
    from hal.conformance.case import judge

    problems = []
    for seqlens, s_q, causal in SHAPES:
        for name, mutate in MUTATIONS.items():
            for seed in seeds:
                case = mla_case(seqlens, s_q, 16, causal, seed)
                mutate(case)
                want_out, want_lse = mla_oracle(case["q"], case["k"], case["table"], case["seqlens"], causal)
                out, lse = run_mla(backend, case)
                label = f"{backend} {seqlens} s_q={s_q} causal={causal} {name} seed={seed}"
                if not torch.equal(nonfinite_pattern(out), nonfinite_pattern(want_out)):
                    problems.append(f"{label}: out non-finite pattern differs")
                if not torch.equal(nonfinite_pattern(lse), nonfinite_pattern(want_lse)):
                    problems.append(f"{label}: lse non-finite pattern differs")
                empty_marker = (out.double().cpu() == 0).all(-1).permute(0, 2, 1) & torch.isposinf(lse.double().cpu())
                real_empty = torch.isposinf(want_lse) & (want_out == 0).all(-1).permute(0, 2, 1)
                if bool((empty_marker & ~real_empty).any()):
                    problems.append(f"{label}: the empty-row marker where the row sees keys")
                for m in judge("mla_decode", "out", out.float().cpu(), want_out.float()) + judge("mla_decode", "lse", lse.cpu(), want_lse.float()):
                    if not m.passed:
                        problems.append(f"{label}: {m.output} {m.metric}={m.value:.3g} {m.note}")
    return problems
