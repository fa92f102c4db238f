"""The SQLite backend's own files: what the interface tests on both backends cannot see."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack

from hub.config import Settings
from hub.models import Event
from hub.store import EventBatch, create_store


def _wal_generation(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL starts over."""
    with wal.open("rb") as file:
        return int.from_bytes(file.read(16)[12:16], "big")


async def test_the_wal_starts_over_under_a_steady_stream_of_commits(tmp_path: Path) -> None:
    """Commits back to back for 3 s: past its limit, the WAL still starts over, so it stays bounded."""
    store = create_store(Settings(data_dir=tmp_path, sqlite_wal_limit_bytes=1024 * 1024))
    await store.open()
    until = time.monotonic() + 3.0

    async def stream(agent_id: str) -> None:
        first = 1
        while time.monotonic() < until:
            events: list[Event] = [{"seq": seq, "ts": time.time(), "kind": "file_open", "pid": 7}
                                   for seq in range(first, first + 100)]  # fmt: skip
            bodies = [msgpack.packb(event) for event in events]
            await store.commit_events(EventBatch(agent_id, events, bodies, time.time()))
            first += 100

    try:
        started_at = _wal_generation(tmp_path / "hub.db-wal")
        # Eight agents keep the writer busy: a commit is always waiting when the last one ends.
        await asyncio.gather(*(stream(f"agent-{index}") for index in range(8)))
        assert _wal_generation(tmp_path / "hub.db-wal") - started_at >= 3
    finally:
        await store.close()
