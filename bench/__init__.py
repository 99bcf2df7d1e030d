"""Benchmarks: time every conformance case on each backend and on installed peers, and report the
fraction of this machine's measured peak (copy bandwidth, matmul FLOP rate) and the ratios.

- :mod:`~hal.bench.timing`: warm-up, repeats, median; CUDA events on GPUs.
- :mod:`~hal.bench.peaks`: the machine's measured copy bandwidth and matmul rate (once per process).
- :mod:`~hal.bench.work`: bytes moved and FLOPs of each operator for given inputs.
- :mod:`~hal.bench.peers`: other implementations of the same operator (torch built-ins, flash_mla,
  deep_gemm when importable).
- :mod:`~hal.bench.runner`: puts them together for ``hal bench``.

Results committed under ``bench/results/`` carry device, versions and date.
"""
