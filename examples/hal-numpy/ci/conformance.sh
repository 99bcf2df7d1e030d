#!/usr/bin/env bash
# Certify the numpy backend: install, check discovery, run the conformance suite, keep the report.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e .
hal backends
hal conformance --backend numpy --report conformance-report
pytest --pyargs hal.conformance --hal-backend=numpy
