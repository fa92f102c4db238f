"""The ingest pipeline without sockets: CPU per event, by thread, side by side with an earlier tree.

Agents' batches go straight to `Ingestor.ingest` of a hub built by `create_app` (validation,
dedupe, the durable SQLite commit, scoring, anomaly counts), in a process pinned to core 0.
Without TLS, Engine.IO and a load generator in the way, a change to the pipeline shows in a few
percent where the socket benchmark's run-to-run spread is ten. Trees alternate, run by run. The
garbage collector keeps Python's defaults (`agenthub serve` tunes it at start): compare trees
within one run, not these figures with the served hub's.

    python -m bench.pipeline [--agents 100] [--batches 3000] [--runs 3] [--before TREE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from bench.harness import SECRET, add_before_argument, table
from bench.ingest import Batches
from hub.app import create_app
from hub.config import Settings
from hub.keys import INGESTOR, SCORING

HEADERS = ["tree", "run", "events", "events_per_s", "cpu_us_per_event", "main_us", "other_threads_us"]
_EVENTS_PER_BATCH = 100
_WARM_UP_BATCHES = 5  # each agent's, before measuring: its state loaded, the caches warm


async def _measure(agents: int, batches: int, certs: Path, data_dir: Path) -> dict[str, Any]:
    """In the child: run the load through the pipeline of the tree it imports, return the figures."""
    # No quota: the load is as fast as the pipeline takes it.
    settings = Settings(data_dir=data_dir, certs_dir=certs, jwt_secret=SECRET, agent_max_events_per_s=1e9,
                        agent_burst_events=10**9)  # fmt: skip
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    ingestor, scoring = runner.app[INGESTOR], runner.app[SCORING]
    makers = [Batches(agent, _EVENTS_PER_BATCH) for agent in range(agents)]
    next_seq = [1] * agents

    async def agent(index: int, rounds: int) -> None:
        for _ in range(rounds):
            batch = makers[index].next(next_seq[index])
            next_seq[index] += len(batch)
            await ingestor.ingest(f"agent-{index}", {"events": [dict(event) for event in batch]})

    try:
        await asyncio.gather(*(agent(i, _WARM_UP_BATCHES) for i in range(agents)))
        await scoring.drain()
        started, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*(agent(i, batches // agents) for i in range(agents)))
        await scoring.drain()  # scored and its scores stored: all of the work is in the figure
        wall, cpu, main_cpu = (
            time.perf_counter() - started,
            time.process_time() - cpu,
            time.thread_time() - main_cpu,
        )
    finally:
        await runner.cleanup()
    events = batches // agents * agents * _EVENTS_PER_BATCH
    return {
        "events": events,
        "events_per_s": round(events / wall),
        "cpu_us_per_event": round(cpu / events * 1e6, 2),
        "main_us": round(main_cpu / events * 1e6, 2),
        "other_threads_us": round((cpu - main_cpu) / events * 1e6, 2),
    }


def _run_tree(tree: Path, args: argparse.Namespace, certs: Path, work: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--agents", str(args.agents), "--batches",
               str(args.batches), "--certs", str(certs), "--data-dir", str(work)]  # fmt: skip
    pinned = ["taskset", "-c", "0", *command] if (os.cpu_count() or 1) > 1 else command
    # This script, with `hub` and `bench` imported from the tree measured.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HUB_")}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run(pinned, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the pipeline run in {tree} failed:\n{done.stderr}")
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100, help="agents sending at once (default 100)")
    parser.add_argument(
        "--batches", type=int, default=3000, help="batches of 100 measured a run (default 3000)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each tree (default 3)")
    add_before_argument(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(uvloop.run(_measure(args.agents, args.batches, args.certs, args.data_dir))))
        return
    here = Path(__file__).resolve().parent.parent
    trees = [("now", here), *([("before", args.before.resolve())] if args.before else [])]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="agenthub-pipeline-") as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run([sys.executable, "-m", "hub.cli", "certs", "init", "--dir", str(certs)],
                       cwd=here, check=True, capture_output=True)  # fmt: skip
        for run in range(1, args.runs + 1):
            for name, tree in trees:
                print(f"run {run}: {name} ({tree})...", file=sys.stderr, flush=True)
                work = Path(tmp) / f"{name}-{run}"
                rows.append({"tree": name, "run": run, **_run_tree(tree, args, certs, work)})
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(table(rows, HEADERS))


if __name__ == "__main__":
    main()
