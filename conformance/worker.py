"""Child process of an isolated conformance run: reads case ids (JSON list) on stdin, prints one
JSON line per event (``start`` before a case, ``result`` after it) on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hal.conformance.catalogue import all_cases
from hal.conformance.golden import load_goldens
from hal.conformance.runner import execute


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.conformance.worker")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--golden", type=Path, help="judge against goldens recorded in this directory")
    args = parser.parse_args()
    wanted = json.loads(sys.stdin.read())
    by_id = {case.id: case for case in all_cases()}
    goldens = load_goldens(args.golden)[1] if args.golden else {}
    for case_id in wanted:
        print(json.dumps({"event": "start", "case": case_id}), flush=True)
        result = execute(by_id[case_id], args.backend, args.device, goldens[case_id] if args.golden else None)
        print(json.dumps({"event": "result", "result": result.to_json()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
