"""Every benchmark in one run, then its figures beside the targets: `make bench` / `make bench-quick`.

    python -m bench [--quick]

Ingest (the matrix, then its plots), connections and fan-out run one after another, each as
its own process exactly as its own `make bench-*` target runs it, and each merges its figures
into `bench/results/latest.json`, which starts empty. The figures the targets name are then
printed in one table.
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.harness import RESULTS, table

# (module and arguments) of each step, full and quick.
STEPS: dict[bool, list[list[str]]] = {
    False: [
        ["bench.ingest"],
        ["bench.plots"],
        ["bench.connections"],
        ["bench.dashboards", "--only", "fanout"],
    ],
    True: [
        ["bench.ingest", "--quick"],
        ["bench.connections", "--agents", "1000", "--steps", "1"],
        ["bench.dashboards", "--only", "fanout", "--quick"],
    ],
}
# key in latest.json, what it is, the comparison that meets the target, the target.
TARGETS: list[tuple[str, str, Callable[[float, float], bool], float]] = [
    ("ingest_events_per_s", "ingest events/s (batches of 100)", operator.ge, 150_000),
    ("ratio_json", "hub / bare server events/s", operator.ge, 0.5),
    ("ratio_socket_http", "socket / HTTP per batch events/s", operator.ge, 3.0),
    ("ack_p99_ms", "ack p99 ms at half the peak", operator.lt, 50),
    ("push_p99_ms", "emit-to-dashboard p99 ms at half the peak", operator.lt, 100),
    ("rss_per_connection_kib", "hub RSS KiB per connection", operator.lt, 64),
    ("fanout_deliveries_per_s", "fan-out deliveries/s (200 dashboards)", operator.ge, 150_000),
    ("fanout_push_p99_ms_at_20000_per_s.batch", "fan-out p99 ms at 20,000/s", operator.lt, 20),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run every benchmark, then print its figures beside the targets."
    )
    parser.add_argument("--quick", action="store_true", help="the short version of each (about 2 minutes)")
    args = parser.parse_args()
    RESULTS.unlink(missing_ok=True)  # this run's figures only
    started = time.monotonic()
    failed = []
    for step in STEPS[args.quick]:
        print(f"\n== python -m {' '.join(step)}", flush=True)
        if subprocess.run([sys.executable, "-m", *step], check=False).returncode:
            failed.append(" ".join(step))  # the others still run; their figures still count
    figures = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = []
    for key, what, meets, target in TARGETS:
        value = _figure(figures, key)
        verdict = "-" if value is None else "met" if meets(value, target) else "not met"
        rows.append({"figure": what, "key": key, "value": value, "target": target, "verdict": verdict})
    print(f"\nall benchmarks in {time.monotonic() - started:.0f} s; figures in {RESULTS}\n")
    print(table(rows, ["figure", "key", "value", "target", "verdict"]))
    if failed:
        raise SystemExit(f"failed: {'; '.join(failed)}")


def _figure(figures: dict[str, Any], key: str) -> float | None:
    """The figure at `key`; a dot steps into a nested object."""
    value: Any = figures
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


if __name__ == "__main__":
    main()
