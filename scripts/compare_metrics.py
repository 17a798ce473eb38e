"""Compares two runs' ``metrics.jsonl`` key by key, leaving out wall-clock measurements.

    python scripts/compare_metrics.py RUN_A RUN_B [--rtol 0]

A run is a workdir (its ``metrics.jsonl`` is read) or the file itself. Records are matched by
(split, step); every key other than the timing keys (``time``, ``time/...``, ``..._time_s``,
``perf/..._per_s``, ``perf/..._mfu``, ``perf/peak_flops``) must be present in both and equal
(within ``--rtol`` when given). Prints one line per difference and a last line
``identical=<true|false> records=<n> values=<n>``; the exit status is 0 when identical.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

TIMING = re.compile(r"^(time(/.*)?|.*_time_s|perf/.*_per_s|perf/.*_mfu|perf/peak_flops)$")


def read_records(run: str) -> dict[tuple[str, int], dict]:
    """(split, step) -> record of a workdir's (or a file's) metrics.jsonl; the last record of a
    (split, step) wins, as in a resumed run."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[(record.get("split", "train"), int(record["step"]))] = record
    return records


def _equal(a, b, rtol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def differences(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict],
                rtol: float = 0.0) -> tuple[list[str], int]:
    """(one line per difference, number of values compared)."""
    lines, compared = [], 0
    for where in sorted(set(a) | set(b)):
        if where not in a or where not in b:
            lines.append(f"{where}: only in run {'A' if where in a else 'B'}")
            continue
        keys = {k for k in set(a[where]) | set(b[where]) if not TIMING.match(k) and k not in ("step", "split")}
        for key in sorted(keys):
            if key not in a[where] or key not in b[where]:
                lines.append(f"{where} {key}: only in run {'A' if key in a[where] else 'B'}")
            elif not _equal(a[where][key], b[where][key], rtol):
                lines.append(f"{where} {key}: {a[where][key]!r} != {b[where][key]!r}")
            compared += 1
    return lines, compared


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: exact)")
    args = parser.parse_args(argv)
    a, b = read_records(args.run_a), read_records(args.run_b)
    lines, compared = differences(a, b, args.rtol)
    for line in lines:
        print(line)
    print(f"identical={str(not lines).lower()} records={len(set(a) | set(b))} values={compared}")
    return 0 if not lines else 1


if __name__ == "__main__":
    sys.exit(main())
