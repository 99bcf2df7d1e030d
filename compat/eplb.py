"""DeepSeek's EPLB on hal (``import hal.compat.eplb as eplb``), as its ``eplb.py`` has it now.

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` returns
``(phy2log, log2phy, logcnt)`` exactly as DeepSeek's (ties and float32 pack sums included); its
helpers ``rebalance_experts_hierarchical``, ``replicate_experts`` (``num_phy``) and
``balanced_packing`` are here under their names too. Contract: :mod:`hal.ops.eplb`; unlike
DeepSeek's, malformed loads and sizes raise typed errors naming the argument.
"""

from hal.ops.eplb import balanced_packing, rebalance_experts, rebalance_experts_hierarchical, replicate_experts  # noqa: F401 (DeepSeek's helpers)

__all__ = ["rebalance_experts"]  # DeepSeek's export; the helpers are attributes, as there
