"""Event table layouts side by side: SQLite's own CPU per stored event, for a schema decision.

    python -m bench.event_layout [--agents 100] [--events 600000] [--group 15] [--runs 2]

Replays the hub's write pattern without the hub: batches of 100 events from `--agents`
agents interleaved, one multi-row `INSERT ... ON CONFLICT DO NOTHING` per batch, `--group`
batches per commit (WAL, `synchronous=FULL`, as `hub.store.sqlite`), and a passive checkpoint
from a second connection every 0.5 s. Rows are built before the clock starts: the figures are
CPU time (this thread's, so fsync waits are not counted) of the insert, the commit and the
checkpoint, per event. Layouts: the hub's (`WITHOUT ROWID`, keyed by agent and seq), a rowid
table with a UNIQUE index on the same key, and the hub's at larger page sizes. The layouts
alternate, `--runs` times each, so machine drift spreads over all of them.
"""

from __future__ import annotations

import argparse
import platform
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from bench.harness import table

BATCH = 100
CHECKPOINT_EVERY_S = 0.5
COLUMNS = "agent_id TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, " \
          "pid INTEGER NOT NULL, received_at REAL NOT NULL, body BLOB NOT NULL"  # fmt: skip
HEADERS = ["layout", "page", "run", "insert_us", "commit_us", "checkpoint_us", "total_us", "db_mb"]


@dataclass(frozen=True)
class Layout:
    name: str
    table: str
    page_size: int = 4096


LAYOUTS = [
    Layout(
        "hub (WITHOUT ROWID)", f"CREATE TABLE events ({COLUMNS}, PRIMARY KEY (agent_id, seq)) WITHOUT ROWID"
    ),
    Layout("rowid + UNIQUE", f"CREATE TABLE events ({COLUMNS}, UNIQUE (agent_id, seq))"),
    *(
        Layout(
            "hub (WITHOUT ROWID)",
            f"CREATE TABLE events ({COLUMNS}, PRIMARY KEY (agent_id, seq)) WITHOUT ROWID",
            size,
        )
        for size in (16384, 65536)
    ),
]
INSERT = (
    "INSERT INTO events (agent_id, seq, ts, kind, pid, received_at, body) VALUES "  # noqa: S608 - placeholders only
    + ",".join(["(?,?,?,?,?,?,?)"] * BATCH)
    + " ON CONFLICT (agent_id, seq) DO NOTHING"
)


def _batch(agent: int, first: int) -> list[Any]:
    """The bound values of one agent's batch: the shape of a process event, as the hub stores it."""
    now = time.time()
    rows: list[Any] = []
    for seq in range(first, first + BATCH):
        argv = ["python3", "-m", "worker", f"--job={seq}"]
        event = {"seq": seq, "ts": now, "kind": "process_start", "pid": 4000 + seq % 30_000, "ppid": 1200,
                 "exe": "/usr/bin/python3", "comm": "python3", "argv": argv, "uid": 1000,
                 "container": "web-7f9c"}  # fmt: skip
        rows += (f"agent-{agent:04d}", seq, now, "process_start", event["pid"], now, msgpack.packb(event))
    return rows


def measure(layout: Layout, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Store `args.events` events in a new database at `path` laid out as `layout`."""
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute(f"PRAGMA page_size={layout.page_size}")
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA synchronous=FULL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute(layout.table)
    checkpointer = sqlite3.connect(path, isolation_level=None)
    next_seq = [1] * args.agents
    insert_s = commit_s = checkpoint_s = 0.0
    stored, checkpointed_at = 0, time.monotonic()
    while stored < args.events:
        batches = []
        for _ in range(args.group):
            agent = random.randrange(args.agents)
            batches.append(_batch(agent, next_seq[agent]))
            next_seq[agent] += BATCH
        started = time.thread_time()
        writer.execute("BEGIN IMMEDIATE")
        for rows in batches:
            writer.execute(INSERT, rows)
        inserted = time.thread_time()
        writer.execute("COMMIT")
        insert_s, commit_s = insert_s + inserted - started, commit_s + time.thread_time() - inserted
        stored += args.group * BATCH
        if time.monotonic() - checkpointed_at >= CHECKPOINT_EVERY_S:
            started = time.thread_time()
            checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            checkpoint_s += time.thread_time() - started
            checkpointed_at = time.monotonic()
    checkpointer.close()
    writer.close()

    def per_event(seconds: float) -> float:
        return round(seconds * 1e6 / stored, 2)

    return {"layout": layout.name, "page": layout.page_size, "insert_us": per_event(insert_s),
            "commit_us": per_event(commit_s), "checkpoint_us": per_event(checkpoint_s),
            "total_us": per_event(insert_s + commit_s + checkpoint_s),
            "db_mb": round(path.stat().st_size / 1e6)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="SQLite's CPU per stored event, by event table layout.")
    parser.add_argument("--agents", type=int, default=100, help="agents interleaved (default 100)")
    parser.add_argument("--events", type=int, default=600_000, help="events per run (default 600000)")
    parser.add_argument("--group", type=int, default=15, help="batches of 100 per commit (default 15)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each layout (default 2)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="agenthub-layout-") as tmp:
        for run in range(1, args.runs + 1):
            for layout in LAYOUTS:
                print(f"run {run}: {layout.name}, page {layout.page_size}...", flush=True)
                path = Path(tmp) / f"events-{len(rows)}.db"
                rows.append({**measure(layout, args, path), "run": run})
    print(f"machine: {platform.node()}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    print(table(rows, HEADERS))


if __name__ == "__main__":
    main()
