"""The online-softmax step every attention kernel here shares (log2 domain, NaN-propagating)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["online_softmax_update"]


@triton.jit
def online_softmax_update(m_i, l_i, acc, scores, values):
    """Fold one block of keys into the running state.

    Args:
        m_i, l_i: [H] running max (log2 units) and sum; acc: [H, D] running ``p @ V``.
        scores: [H, N] scaled scores in log2 units, -inf where a key is masked.
        values: [N, D] the block's values (0 rows for keys never read).

    A NaN score makes the row's max NaN (``tl.max`` alone would skip it, as the GPU's fmax does),
    so NaN reaches out and lse; while the max is still -inf the block contributes nothing.
    """
    has_nan = tl.sum((scores != scores).to(tl.int32), axis=1) > 0
    m_new = tl.maximum(m_i, tl.max(scores, axis=1), propagate_nan=tl.PropagateNan.ALL)
    m_new = tl.where(has_nan, float("nan"), m_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision="ieee")
    return m_new, l_i, acc
