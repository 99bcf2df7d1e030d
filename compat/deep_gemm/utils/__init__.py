"""``deep_gemm.utils``: DeepGEMM's math and layout helpers (casts, UE8M0 scales, TMA-aligned
layouts, alignments), the same functions as on :mod:`hal.compat.deep_gemm` itself.

``init_dist`` and ``uneven_all_gather`` (its ``utils.dist`` test helpers) are not provided; see
``hal.compat.deep_gemm.NOT_PROVIDED``."""

from __future__ import annotations

from hal.compat.deep_gemm.utils import layout, math
from hal.compat.deep_gemm.utils.layout import *  # noqa: F403
from hal.compat.deep_gemm.utils.math import *  # noqa: F403

__all__ = ["layout", "math", *layout.__all__, *math.__all__]
