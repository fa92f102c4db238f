"""Store benchmark: the two backends side by side, for sizing a deployment.

Each run opens a fresh store (a SQLite file; a PostgreSQL schema on the machine's server),
then N writers commit batches of events as agents' batches are committed (group commit, one
durable commit per group), and reports committed events/s, the p50/p99 time a batch waits
for its commit, and the bytes each stored event takes on disk (table and indexes). Nothing
is pinned: SQLite works in this process, PostgreSQL in its own; each may use both cores.

    python -m bench.store [--events 200000] [--writers 10 100] [--batch 100] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import msgpack

from bench.harness import percentile, record_results, table
from hub.config import Settings
from hub.models import Event
from hub.store import EventBatch, Store, create_store

HEADERS = [
    "backend",
    "writers",
    "batch",
    "events",
    "events_per_s",
    "commit_p50_ms",
    "commit_p99_ms",
    "bytes_per_event",
]
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _batch(agent_id: str, first_seq: int, size: int) -> EventBatch:
    # The shape of a typical process event: a command line, its parent, a container name.
    now = time.time()
    events: list[Event] = [
        {
            "seq": seq,
            "ts": now,
            "kind": "process_start",
            "pid": 4000 + seq % 30_000,
            "ppid": 1200,
            "exe": "/usr/bin/python3",
            "comm": "python3",
            "argv": ["python3", "-m", "worker", f"--job={seq}"],
            "uid": 1000,
            "container": "web-7f9c",
        }
        for seq in range(first_seq, first_seq + size)
    ]
    return EventBatch(agent_id, events, [msgpack.packb(event) for event in events], now)


async def _write(store: Store, writers: int, batch: int, events: int) -> tuple[float, list[float]]:
    per_writer = events // writers // batch
    waits: list[float] = []

    async def writer(n: int) -> None:
        for i in range(per_writer):
            prepared = _batch(f"agent-{n}", 1 + i * batch, batch)
            started = time.perf_counter()
            await store.commit_events(prepared)
            waits.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    return time.perf_counter() - started, waits


async def _sqlite_bytes(settings: Settings) -> int:
    return sum(path.stat().st_size for path in settings.data_dir.glob("hub.db*"))


async def _postgres_bytes(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT pg_total_relation_size('events')"))
    finally:
        await conn.close()


async def _run(backend: str, writers: int, batch: int, events: int, postgres_url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        schema = "bench_store_" + secrets.token_hex(4)
        url = f"{postgres_url}?search_path={schema}"
        if backend == "postgresql":
            admin = await asyncpg.connect(postgres_url)
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        settings = Settings(data_dir=Path(folder), database_url=url if backend == "postgresql" else None)
        store = create_store(settings)
        await store.open()
        try:
            seconds, waits = await _write(store, writers, batch, events)
            stored = await store.count_events()
        finally:
            await store.close()
        size = await (_postgres_bytes(url) if backend == "postgresql" else _sqlite_bytes(settings))
        if backend == "postgresql":
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()
    return {"backend": backend, "writers": writers, "batch": batch, "events": stored,
            "events_per_s": round(stored / seconds), "commit_p50_ms": percentile(waits, 50),
            "commit_p99_ms": percentile(waits, 99), "bytes_per_event": round(size / stored)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events each run commits")
    parser.add_argument("--writers", type=int, nargs="+", default=[10, 100], help="concurrent writers")
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    args = parser.parse_args()
    rows = []
    for writers in args.writers:
        for backend in ("sqlite", "postgresql"):
            rows.append(await _run(backend, writers, args.batch, args.events, args.postgres_url))
            print(f"  {backend} with {writers} writers: {rows[-1]['events_per_s']:,} events/s", flush=True)
    print(f"\nstore backends on {platform.node()} ({os.cpu_count()} cores), batches of {args.batch}:")
    print(table(rows, HEADERS))
    record_results({"store": rows})


if __name__ == "__main__":
    asyncio.run(main())
