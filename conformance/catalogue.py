"""The catalogue: every conformance case, read as a table, shared by `hal conformance`, the pytest
plugin and `hal bench`."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from hal.conformance.case import Case
from hal.conformance.cases_ep import ep_cases, ep_local_cases
from hal.conformance.cases_gemm import bf16_gemm_cases, cast_cases, gemm_cases, gemm_v2_cases
from hal.conformance.cases_indexer import indexer_cases
from hal.conformance.cases_mla import mla_cases
from hal.conformance.cases_mla_v2 import mla_v2_cases, quantize_cache_cases

__all__ = ["all_cases", "select_cases"]


def all_cases() -> list[Case]:
    """Every case, quick and full, in a stable order (operator, then declaration order)."""
    cases = mla_cases() + mla_v2_cases() + quantize_cache_cases() + indexer_cases() + gemm_cases() + gemm_v2_cases() + bf16_gemm_cases() + cast_cases() + ep_cases() + ep_local_cases()
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise RuntimeError(f"duplicate conformance case ids: {sorted(duplicates)}")
    return cases


def select_cases(*, quick: bool, ops: Sequence[str] = (), patterns: Sequence[str] = ()) -> list[Case]:
    """Narrow the catalogue.

    Args:
        quick: only the quick subset (True) or every case (False).
        ops: operator names or shell patterns (``ep_*``) to keep (all when empty).
        patterns: shell-style patterns matched against case ids (``mla_decode/*sq2*``) or names.
    """
    chosen = []
    for case in all_cases():
        if quick and not case.quick:
            continue
        if ops and not any(fnmatch.fnmatch(case.op, p) for p in ops):
            continue
        if patterns and not any(fnmatch.fnmatch(case.id, p) or fnmatch.fnmatch(case.name, p) for p in patterns):
            continue
        chosen.append(case)
    return chosen
