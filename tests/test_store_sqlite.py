"""The SQLite backend's own files: what the interface tests on both backends cannot see."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest

from hub.config import Settings
from hub.models import Event
from hub.store import EventBatch, Store, create_store

WAL_LIMIT = 1024 * 1024


def _wal_generation(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL starts over."""
    with wal.open("rb") as file:
        return int.from_bytes(file.read(16)[12:16], "big")


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A SQLite store whose WAL starts over past 1 MiB."""
    opened = create_store(Settings(data_dir=tmp_path, database_url=None, sqlite_wal_limit_bytes=WAL_LIMIT))
    await opened.open()
    yield opened
    await opened.close()


async def _stream_until(store: Store, done: Callable[[], bool], *, limit_s: float = 30.0) -> None:
    """Commit batches back to back from eight agents until `done()` or `limit_s` has passed."""
    until = time.monotonic() + limit_s

    async def agent(agent_id: str) -> None:
        first = 1
        while not done() and time.monotonic() < until:
            events: list[Event] = [{"seq": seq, "ts": time.time(), "kind": "file_open", "pid": 7}
                                   for seq in range(first, first + 100)]  # fmt: skip
            bodies = [msgpack.packb(event) for event in events]
            await store.commit_events(EventBatch(agent_id, events, bodies, time.time()))
            first += 100

    # Eight agents keep the writer busy: a commit is always waiting when the last one ends.
    await asyncio.gather(*(agent(f"agent-{index}") for index in range(8)))


async def test_the_wal_starts_over_under_a_steady_stream_of_commits(
    sqlite_store: Store, tmp_path: Path
) -> None:
    """Commits back to back: past its limit the WAL still starts over, again and again."""
    wal = tmp_path / "hub.db-wal"
    started_at = _wal_generation(wal)
    await _stream_until(sqlite_store, lambda: _wal_generation(wal) - started_at >= 3)
    assert _wal_generation(wal) - started_at >= 3


async def test_a_read_that_holds_the_wal_back_is_reported_then_let_go(
    sqlite_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read holding an old snapshot keeps the WAL from starting over: warned of, then recovered."""
    wal = tmp_path / "hub.db-wal"
    reader = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    with contextlib.closing(reader):
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # its snapshot is held from here
        held_at = _wal_generation(wal)
        with caplog.at_level(logging.WARNING, logger="hub.store.sqlite"):
            await _stream_until(sqlite_store, lambda: "a long read keeps it" in caplog.text)
        assert "times HUB_SQLITE_WAL_LIMIT_BYTES" in caplog.text
        assert _wal_generation(wal) == held_at
        reader.execute("COMMIT")
    await _stream_until(sqlite_store, lambda: _wal_generation(wal) > held_at)
    assert _wal_generation(wal) > held_at
