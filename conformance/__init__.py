"""Conformance: certify a backend against the Hopper-semantics references in ``hal.ops``.

- :mod:`~hal.conformance.metrics`: the metric and threshold of every operator output, in one place.
- :mod:`~hal.conformance.catalogue`: every case (quick subset for CPU interpreters, full grid with
  the DeepSeek-V3 shapes), shared by ``hal conformance``, the pytest plugin and ``hal bench``.
- :mod:`~hal.conformance.runner`: runs cases with per-case timeouts, optionally isolated in a child
  process; :mod:`~hal.conformance.report`: JSON, Markdown and HTML reports.
"""
