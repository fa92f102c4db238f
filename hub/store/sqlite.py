"""SQLite backend, the embedded default: WAL, `synchronous=FULL`, group commit in one writer thread.

Writes run in a dedicated thread with the standard `sqlite3` module rather than aiosqlite: a
group commit is then one thread hop instead of one per statement. The store's jobs are
coroutines written for both backends; on SQLite nothing in them suspends (every `Conn` call
below completes before it returns), so a thread runs one to its end with a single `send`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, Unpack

from hub.store.sql import Conn, SqlStore, StoreOptions, WriteJob, migrations

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHECKPOINT_EVERY_S = 0.5


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so an acked event survives a power cut.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # How long a statement waits for a lock another process holds before failing; a failed
    # write is answered `unavailable`, and the agent keeps its batch and retries.
    conn.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    for version, script in migrations("sqlite"):
        if version > current:
            log.info("applying migration %04d", version)
            conn.executescript(f"BEGIN;\n{script}\nINSERT INTO schema_version VALUES ({version});\nCOMMIT;")


def _run_to_end(job: Coroutine[Any, Any, T]) -> T:
    try:
        job.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]  # StopIteration carries the coroutine's T
    job.close()
    raise RuntimeError("a store job awaited something other than its SQLite connection")


class SqliteConn:
    """`Conn` over one `sqlite3` connection; every call completes before it returns."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params).fetchone()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    async def begin(self, *, exclusive: bool) -> None:
        # IMMEDIATE takes the database's one write lock at once: every write transaction is
        # exclusive, across processes too.
        self._db.execute("BEGIN IMMEDIATE")

    async def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def checkpoint(self) -> int:
        """Copy the WAL's committed pages into the database as far as readers allow, waiting for
        no one (PASSIVE); return how many pages the WAL holds (0 if the checkpoint failed)."""
        try:
            _busy, pages, _copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed (will retry): %s", exc)
            return 0
        return max(0, int(pages))


class SqliteStore(SqlStore):
    """The embedded store: one file, durable acks, several processes may share it."""

    storage_errors = (sqlite3.Error,)

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 30.0,
        wal_limit_bytes: int = 64 * 1024 * 1024,
        **options: Unpack[StoreOptions],
    ):
        super().__init__(**options)
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._wal_limit_bytes = wal_limit_bytes
        self._page_size = 4096  # read from the database at open
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._connections: list[tuple[sqlite3.Connection, ThreadPoolExecutor]] = []
        self._writer: SqliteConn | None = None
        self._reader: SqliteConn | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._restart_wal = False  # the WAL is past its limit: the writer starts it over
        self._wal_warned_bytes = 0

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        loop = asyncio.get_running_loop()
        writer = await loop.run_in_executor(self._write_thread, self._open_writer)
        # Checkpoints run in their own thread, beside the writer: an automatic checkpoint
        # inside COMMIT would stall every ack waiting on that commit.
        writer.execute("PRAGMA wal_autocheckpoint=0")
        # Once the WAL starts over, its first commit truncates a file that grew past the limit.
        writer.execute(f"PRAGMA journal_size_limit={self._wal_limit_bytes}")
        self._page_size = writer.execute("PRAGMA page_size").fetchone()[0]
        timeout = self._busy_timeout_s
        reader = await loop.run_in_executor(self._read_thread, _connect, self._path, timeout)
        checkpointer = await loop.run_in_executor(self._checkpoint_thread, _connect, self._path, timeout)
        # Closed in this order; the writer last: closing it checkpoints the WAL.
        self._connections = [(checkpointer, self._checkpoint_thread), (reader, self._read_thread),
                             (writer, self._write_thread)]  # fmt: skip
        self._writer, self._reader = SqliteConn(writer), SqliteConn(reader)
        self._start_writer()
        self._checkpoint_task = asyncio.create_task(
            self._checkpoint_loop(SqliteConn(checkpointer)), name="sqlite-checkpoint"
        )

    def _open_writer(self) -> sqlite3.Connection:
        # Processes opening a new database at once (the hub, `agenthub certs issue`...) would
        # race to switch it to WAL and to apply the first migration: one at a time.
        lock = os.open(self._path.parent / f"{self._path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn = _connect(self._path, self._busy_timeout_s)
            # Event bodies hold command lines: owner only (SQLite gives -wal and -shm the same mode).
            self._path.chmod(0o600)
            _migrate(conn)
        finally:
            os.close(lock)  # closing releases the lock
        return conn

    async def close(self) -> None:
        await self._stop_writer()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for conn, thread in self._connections:
            await loop.run_in_executor(thread, conn.close)
        for thread in (self._checkpoint_thread, self._read_thread, self._write_thread):
            thread.shutdown(wait=True)

    async def _read(self, run: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        reader = self._reader
        assert reader is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._read_thread, lambda: _run_to_end(run(reader))
        )

    async def _commit(self, group: list[WriteJob]) -> list[tuple[bool, Any]]:
        writer = self._writer
        assert writer is not None
        restart_wal, self._restart_wal = self._restart_wal, False

        def run() -> list[tuple[bool, Any]]:
            if restart_wal:
                # Copy what was committed during the checkpointer's pass (a few ms, its fsyncs
                # included): this transaction then finds the WAL copied whole and starts it over.
                writer.checkpoint()
            return _run_to_end(self.run_group(writer, group))

        return await asyncio.get_running_loop().run_in_executor(self._write_thread, run)

    async def _checkpoint_loop(self, conn: SqliteConn) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_CHECKPOINT_EVERY_S)
            # The copying, beside the writer rather than inside its commits. But a steady stream
            # of commits never leaves the WAL copied whole, so it would never start over and would
            # grow without bound: past its limit, the writer copies the rest before its next commit.
            wal_bytes = await loop.run_in_executor(self._checkpoint_thread, conn.checkpoint) * self._page_size
            self._restart_wal |= wal_bytes >= self._wal_limit_bytes
            self._warn_of_a_large_wal(wal_bytes)

    def _warn_of_a_large_wal(self, wal_bytes: int) -> None:
        # A read that holds an old snapshot (a long query, another process) keeps the WAL from
        # being copied whole and starting over. Said each time the WAL doubles, not at every pass.
        if wal_bytes < 4 * self._wal_limit_bytes:
            self._wal_warned_bytes = 0
        elif wal_bytes >= 2 * self._wal_warned_bytes:
            log.warning(
                "the WAL holds %d MiB, %.0f times HUB_SQLITE_WAL_LIMIT_BYTES: a long read keeps it "
                "from starting over (a query, or another process holding the database open)",
                wal_bytes >> 20,
                wal_bytes / self._wal_limit_bytes,
            )
            self._wal_warned_bytes = wal_bytes
