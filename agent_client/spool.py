"""The on-disk queue every event passes through before it is sent."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Final

import orjson

from agent_client.wire import Event

DEFAULT_MAX_EVENTS: Final = 1_000_000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('dropped', 0), ('synced', 0);
"""


class Spool:
    """A SQLite file that assigns `seq` and keeps events until the hub has stored them.

    Methods block (a commit waits for fsync); call them through `asyncio.to_thread`.
    They are safe to call from several threads.
    """

    def __init__(self, path: str | PathLike[str], *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.path = path
        self.max_events = max_events
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Events hold command lines, sometimes with secrets: owner only (-wal and -shm follow).
        Path(path).chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._count = 0
        self._dropped = 0
        self._next_seq = 1
        self._acked = 0
        self._load_state()

    def append(self, events: list[Event]) -> list[int]:
        """Assign the next seqs to `events`, store them durably and return the seqs."""
        if not events:
            return []
        bodies = [_encode(event) for event in events]
        with self._lock, self._transaction():
            first = self._next_seq
            seqs = list(range(first, first + len(bodies)))
            self._db.executemany(
                "INSERT INTO events (seq, body) VALUES (?, ?)", zip(seqs, bodies, strict=True)
            )
            self._next_seq = first + len(bodies)
            self._set_meta("next_seq", self._next_seq)
            self._count += len(bodies)
            self._trim()
        return seqs

    def pending(self, after_seq: int, limit: int) -> list[Event]:
        """Return up to `limit` spooled events with seq > `after_seq`, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [_decode(seq, body) for seq, body in rows]

    def ack_through(self, seq: int) -> None:
        """Forget every event with seq <= `seq`; later seqs are always greater than `seq`."""
        with self._lock, self._transaction():
            self._count -= self._db.execute("DELETE FROM events WHERE seq <= ?", (seq,)).rowcount
            self._acked = max(self._acked, seq)
            if seq >= self._next_seq:
                self._next_seq = seq + 1
                self._set_meta("next_seq", self._next_seq)

    def resume(self, last_seq: int) -> int:
        """Apply a hello's `last_seq`; return the seq through which the hub has confirmed everything.

        `last_seq` is the highest seq the hub stored, not a promise that everything below it
        is stored: a batch answered `overloaded` may be missing while a later one committed.
        So a file already numbered with the hub's seqs keeps every event it holds (none was
        confirmed: confirmed ones are deleted) and sends them again; the hub dedupes. This
        improves on PROTOCOL.md, which lets an agent drop everything up to `last_seq`.
        Until a first hello has been applied to this file, its seqs are not the hub's: the
        file is new, or was lost and replaced, so whatever it holds is new to the hub and
        moves above `last_seq` (whether or not it has already grown past it).
        """
        with self._lock, self._transaction():
            if self._meta("synced"):
                self._acked = self._confirmed()
                return self._acked
            first = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
            shift = 0 if first is None or first > last_seq else last_seq + 1 - first
            # Through negative seqs: old and new ranges may overlap, and the key must stay unique.
            self._db.execute("UPDATE events SET seq = -seq")
            self._db.execute("UPDATE events SET seq = ? - seq", (shift,))
            self._next_seq = max(self._next_seq + shift, last_seq + 1)
            self._set_meta("next_seq", self._next_seq)
            self._set_meta("synced", 1)
            self._acked = last_seq
        return last_seq

    def acked_through(self) -> int:
        """Return the seq through which the hub has confirmed every event (0 until a first hello)."""
        return self._acked

    def depth(self) -> int:
        """Return how many events wait for the hub."""
        return self._count

    def dropped(self) -> int:
        """Return how many events were discarded because the spool was full (ever)."""
        return self._dropped

    def next_seq(self) -> int:
        """Return the seq the next appended event will get."""
        return self._next_seq

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    def _trim(self) -> None:
        excess = self._count - self.max_events
        if excess <= 0:
            return
        self._db.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
            (excess,),
        )
        self._count -= excess
        self._dropped += excess
        self._set_meta("dropped", self._dropped)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")  # inside: a failed commit must roll back too
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._load_state()
            raise

    def _load_state(self) -> None:
        self._count = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        self._dropped = self._meta("dropped")
        self._next_seq = self._meta("next_seq")
        self._acked = self._confirmed() if self._meta("synced") else 0

    def _confirmed(self) -> int:
        # Everything below the oldest event kept was confirmed (or, if the spool overflowed, dropped).
        first = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
        return (first if first is not None else self._next_seq) - 1

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))


def _encode(event: Event) -> bytes:
    body = {key: value for key, value in event.items() if key != "seq"}
    return orjson.dumps(body)


def _decode(seq: int, body: bytes) -> Event:
    event: Event = orjson.loads(body)
    event["seq"] = seq
    return event
