"""Child process of an isolated conformance run: reads case ids (JSON list) on stdin, writes one
JSON line per event (``start`` before a case, ``result`` after it) to the pipe ``--events-fd``
names, a channel of its own that backend code printing to stdout cannot corrupt."""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--events-fd", type=int, default=1, help="file descriptor the events are written to (default: stdout)")
    args = parser.parse_args()
    events = os.fdopen(args.events_fd, "w", encoding="utf-8") if args.events_fd != 1 else sys.stdout
    wanted = json.loads(sys.stdin.read())
    by_id = {case.id: case for case in all_cases()}
    goldens = load_goldens(args.golden)[1] if args.golden else {}
    for case_id in wanted:
        print(json.dumps({"event": "start", "case": case_id}), file=events, flush=True)
        result = execute(by_id[case_id], args.backend, args.device, goldens[case_id] if args.golden else None)
        print(json.dumps({"event": "result", "result": result.to_json()}), file=events, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
