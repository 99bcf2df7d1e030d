"""Benchmarks: time every conformance case on each backend and on its peers, and report the
fraction of the bound this machine's measured peaks imply (copy bandwidth, fp32 and bf16 matmul
rates) and the ratios.

- :mod:`~hal.bench.timing`: warm-up, repeats, median and spread; candidates interleaved; CUDA events on GPUs.
- :mod:`~hal.bench.peaks`: the machine's copy bandwidth and matmul rates, medians of 9 with their spread.
- :mod:`~hal.bench.work`: bytes moved and FLOPs of each operator, and which matmul peak bounds it.
- :mod:`~hal.bench.memory`: each case's estimated peak memory and the budget that skips it.
- :mod:`~hal.bench.formulation`: a peer's formulations; the fastest correct one is timed.
- :mod:`~hal.bench.peers`, :mod:`~hal.bench.peers_mla`, :mod:`~hal.bench.peers_gemm`: torch's
  formulations of each operator; flash_mla and deep_gemm when importable on a GPU.
- :mod:`~hal.bench.machine`: CPU, cores, memory, versions, load average.
- :mod:`~hal.bench.runner`: puts them together for ``hal bench``.
- :mod:`~hal.bench.plot`: the PNG of fractions of bound written beside the results JSON.

Results committed under ``bench/results/`` carry machine, versions, load and date.
"""
