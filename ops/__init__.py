"""Operator specs: one module per family, each declaring its operators, their checks and references.

- :mod:`hal.ops.mla`: MLA decode over a paged KV cache (FlashMLA).
- :mod:`hal.ops.gemm`, :mod:`hal.ops.fp8_quant`: FP8 GEMMs with fine-grained scales (DeepGEMM v1 names);
  :mod:`hal.ops.gemm_v2` (DeepGEMM's current names, UE8M0 scales, k-grouped), :mod:`hal.ops.gemm_bf16`.
- :mod:`hal.ops.indexer`: DeepSeek-V3.2's lightning-indexer MQA logits (DeepGEMM).
- :mod:`hal.ops.ep`: expert-parallel dispatch layout (DeepEP).
- :mod:`hal.ops.ep_local`: the local kernels around expert-parallel dispatch/combine (pack, unpack, reduce).
- :mod:`hal.ops.eplb`: expert-parallel load balancing (EPLB), a host-side planner.

Importing this package declares every operator in :data:`hal.operator.OPERATORS` and registers
each as a torch custom op (:mod:`hal.ops.torch_library`) so models calling hal compile.
"""

from hal.ops import ep, ep_local, eplb, fp8_quant, gemm, gemm_bf16, gemm_v2, indexer, mla  # noqa: F401  (declares the operators)
from hal.ops import torch_library  # noqa: F401,E402  (registers torch.ops.hal.*; needs the modules above)
