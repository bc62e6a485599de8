"""Run one implementation of a benchmark in a fresh process, so one's allocations cannot hide or
inflate another's peak: the script calls itself with its own arguments plus ``--worker IMPL``
(and any ``extra`` ones, which win over earlier copies) and prints one JSON line last.

    from _worker import parse_or_serve, run_worker
    args = parse_or_serve(parser, IMPLS, worker)       # None in a worker: it has printed its result
    result = run_worker(__file__, "reference")        # {"peak_gb": ..., "s": ...} or {"error": "..."}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run_worker(script: str, impl: str, *extra: str) -> dict:
    """The worker's JSON result, or ``{"error": last stderr line}`` if it failed."""
    cmd = [sys.executable, os.path.abspath(script), *sys.argv[1:], "--worker", impl, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_or_serve(parser: argparse.ArgumentParser, impls, worker) -> argparse.Namespace | None:
    """Parse the command line; under ``--worker IMPL`` run ``worker(args)`` (``args.impl = IMPL``),
    print its JSON line and return None, else return the parsed arguments for the parent run."""
    parser.add_argument("--worker", choices=impls, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:
        return args
    args.impl = args.worker
    print(json.dumps(worker(args)))
    return None
