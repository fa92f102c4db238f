"""SQLite backend: WAL, `synchronous=FULL`, group commit through one writer thread.

Every write is a job queued to one writer. The writer takes all jobs waiting when it is
free and runs them in one transaction (one fsync), each job in its own savepoint so a
failing job cannot take the others down. Callers await their job's future, which resolves
only after COMMIT returned: that is what makes an ack durable.

Writes run in a dedicated thread with the standard `sqlite3` module rather than aiosqlite:
a group commit is then one thread hop instead of one per statement.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import orjson

from hub.models import Event, score_view
from hub.problems import Unavailable
from hub.store import EventBatch, Page, decode_cursor, encode_cursor

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
_CHECKPOINT_EVERY_S = 0.5


@dataclass(slots=True)
class _WriteJob:
    run: Job
    size: int
    future: asyncio.Future[Any] = field(repr=False)


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("hub.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so an acked event survives a power cut.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_size_limit=67108864")  # truncate a WAL that grew past 64 MiB
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    for version, script in _migrations():
        if version > current:
            log.info("applying migration %04d", version)
            conn.executescript(f"BEGIN;\n{script}\nINSERT INTO schema_version VALUES ({version});\nCOMMIT;")


class SqliteStore:
    """The embedded store; see the module docstring for how writes are made durable."""

    def __init__(self, path: Path, *, commit_max_events: int = 5_000, retry_after_ms: int = 1000):
        self._path = path
        self._commit_max = commit_max_events
        self._retry_after_ms = retry_after_ms
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._writer_conn: sqlite3.Connection | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._jobs: asyncio.Queue[_WriteJob] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        loop = asyncio.get_running_loop()
        self._writer_conn = await loop.run_in_executor(self._write_thread, _connect, self._path)
        # Event bodies hold command lines: owner only (SQLite gives -wal and -shm the same mode).
        self._path.chmod(0o600)
        await loop.run_in_executor(self._write_thread, _migrate, self._writer_conn)
        # Checkpoints run in their own thread, beside the writer: an automatic checkpoint
        # inside COMMIT would stall every ack waiting on that commit.
        self._writer_conn.execute("PRAGMA wal_autocheckpoint=0")
        self._reader_conn = await loop.run_in_executor(self._read_thread, _connect, self._path)
        self._checkpoint_conn = await loop.run_in_executor(self._checkpoint_thread, _connect, self._path)
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="sqlite-checkpoint")

    async def close(self) -> None:
        if self._writer_task:
            # Drain: every queued job is committed before the connection closes.
            await self._jobs.join()
        for task in (self._writer_task, self._checkpoint_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for conn, thread in (
            (self._checkpoint_conn, self._checkpoint_thread),
            (self._reader_conn, self._read_thread),
            (self._writer_conn, self._write_thread),  # last: closing it checkpoints the WAL
        ):
            if conn is not None:
                await loop.run_in_executor(thread, conn.close)
            thread.shutdown(wait=True)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # the two doors: every statement goes through one of these ------------------------------

    async def _write(self, run: Job, size: int = 1) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_WriteJob(run, size, future))
        return await future

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader_conn is not None
        conn = self._reader_conn
        return await asyncio.get_running_loop().run_in_executor(self._read_thread, run, conn)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._jobs.get()]
            size = group[0].size
            while size < self._commit_max and not self._jobs.empty():
                job = self._jobs.get_nowait()
                group.append(job)
                size += job.size
            try:
                outcomes = await loop.run_in_executor(self._write_thread, self._run_group, group)
            except sqlite3.Error as exc:  # the commit itself failed: so did every job in it
                log.error("group commit of %d jobs failed: %s", len(group), exc)
                outcomes = [(False, exc)] * len(group)
            for job, (ok, value) in zip(group, outcomes, strict=True):
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    elif isinstance(value, sqlite3.Error):  # disk full, I/O error: retryable
                        job.future.set_exception(
                            Unavailable(f"storage unavailable: {value}", retry_after_ms=self._retry_after_ms)
                        )
                    else:
                        job.future.set_exception(value)
                self._jobs.task_done()

    async def _checkpoint_loop(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self._checkpoint_conn
        assert conn is not None
        while True:
            await asyncio.sleep(_CHECKPOINT_EVERY_S)
            try:
                # PASSIVE copies what it can without blocking the writer or readers.
                await loop.run_in_executor(
                    self._checkpoint_thread, lambda: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                )
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint failed (will retry): %s", exc)

    def _run_group(self, group: list[_WriteJob]) -> list[tuple[bool, Any]]:
        conn = self._writer_conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in group:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job.run(conn)))
                    conn.execute("RELEASE job")
                except Exception as exc:  # one bad job must not fail the others in its group
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    # events ------------------------------------------------------------------------------

    async def commit_events(self, batch: EventBatch) -> set[int]:
        def insert(conn: sqlite3.Connection) -> set[int]:
            new: set[int] = set()
            # One multi-row INSERT per chunk, within SQLite's limit on bound parameters.
            for start in range(0, len(batch.events), _ROWS_PER_INSERT):
                rows: list[Any] = []
                events = batch.events[start : start + _ROWS_PER_INSERT]
                for event, body in zip(events, batch.bodies[start : start + _ROWS_PER_INSERT], strict=True):
                    rows += (batch.agent_id, event["seq"], event["ts"], event["kind"], event["pid"],
                             batch.received_at, body)  # fmt: skip
                cursor = conn.execute(_insert_events_sql(len(events)), rows)
                new.update(row[0] for row in cursor.fetchall())
            return new

        if not batch.events:
            return set()
        result: set[int] = await self._write(insert, len(batch.events))
        return result

    async def last_seq(self, agent_id: str) -> int:
        row = await self._read(
            lambda c: c.execute("SELECT max(seq) FROM events WHERE agent_id = ?", (agent_id,)).fetchone()
        )
        return int(row[0] or 0)

    async def count_events(self, agent_id: str | None = None) -> int:
        if agent_id is None:
            row = await self._read(lambda c: c.execute("SELECT count(*) FROM events").fetchone())
        else:
            row = await self._read(
                lambda c: c.execute("SELECT count(*) FROM events WHERE agent_id = ?", (agent_id,)).fetchone()
            )
        return int(row[0])

    async def replay_events(self, after: tuple[str, int] | None, limit: int) -> list[tuple[str, Event]]:
        agent_id, seq = after or ("", 0)
        rows = await self._read(
            lambda c: c.execute(
                "SELECT agent_id, body FROM events WHERE (agent_id, seq) > (?, ?) "
                "ORDER BY agent_id, seq LIMIT ?",
                (agent_id, seq, limit),
            ).fetchall()
        )
        return [(row[0], msgpack.unpackb(row[1])) for row in rows]

    # agents ------------------------------------------------------------------------------

    async def save_agent(self, agent_id: str, fields: dict[str, Any]) -> None:
        names = list(fields)
        values = [orjson.dumps(v).decode() if isinstance(v, dict) else v for v in fields.values()]
        sql = (
            f"INSERT INTO agents (agent_id, {', '.join(names)}) VALUES (?{', ?' * len(names)}) "  # noqa: S608 - column names come from code, never from input
            f"ON CONFLICT (agent_id) DO UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in names)}"
        )
        await self._write(lambda c: c.execute(sql, [agent_id, *values]))

    async def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        def fetch(conn: sqlite3.Connection) -> dict[str, Any] | None:
            conn.row_factory = sqlite3.Row
            try:
                row = conn.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            finally:
                conn.row_factory = None
            return _agent_view(dict(row)) if row else None

        return await self._read(fetch)

    async def list_agents(self, *, status: str | None, cursor: str | None, limit: int) -> Page:
        key = decode_cursor(cursor, 1)
        after = key[0] if key else ""

        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            conn.row_factory = sqlite3.Row
            try:
                sql = "SELECT * FROM agents WHERE agent_id > ?"
                params: list[Any] = [after]
                if status:
                    sql += " AND status = ?"
                    params.append(status)
                rows = conn.execute(sql + " ORDER BY agent_id LIMIT ?", [*params, limit + 1]).fetchall()
            finally:
                conn.row_factory = None
            return [_agent_view(dict(row)) for row in rows]

        items = await self._read(fetch)
        return _page(items, limit, lambda item: [item["agent_id"]])

    async def mark_all_offline(self, reason: str, now: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE agents SET status = 'offline', status_reason = ?, status_changed_at = ? "
                "WHERE status != 'offline'",
                (reason, now),
            )
        )

    # processes and scores ----------------------------------------------------------------

    async def save_processes(self, states: list[dict[str, Any]]) -> None:
        if states:
            await self._write(lambda c: _upsert_processes(c, states), len(states))

    async def replace_scores(self, states: list[dict[str, Any]]) -> None:
        def replace(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM processes")
            _upsert_processes(conn, states)

        await self._write(replace, len(states))

    async def load_processes(self, agent_id: str) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT state FROM processes WHERE agent_id = ? AND exited = 0", (agent_id,)
            ).fetchall()
        )
        return [orjson.loads(row[0]) for row in rows]

    async def list_scores(
        self, *, risk_min: float, agent_id: str | None, cursor: str | None, limit: int
    ) -> Page:
        key = decode_cursor(cursor, 2)
        sql = "SELECT state FROM processes WHERE risk_score >= ?"
        params: list[Any] = [risk_min]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        if key:
            sql += " AND (risk_score < ? OR (risk_score = ? AND process_key > ?))"
            params += [key[0], key[0], key[1]]
        sql += " ORDER BY risk_score DESC, process_key LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, [*params, limit + 1]).fetchall())
        items = [dict(score_view(orjson.loads(row[0]))) for row in rows]
        return _page(items, limit, lambda item: [item["risk_score"], item["process_key"]])

    async def agent_risk(self, agent_ids: list[str]) -> dict[str, float]:
        if not agent_ids:
            return {}
        marks = ",".join("?" * len(agent_ids))
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT agent_id, max(risk_score) FROM processes WHERE exited = 0 "  # noqa: S608 - only placeholders are interpolated
                f"AND agent_id IN ({marks}) GROUP BY agent_id",
                agent_ids,
            ).fetchall()
        )
        return {row[0]: row[1] for row in rows}

    # alerts ------------------------------------------------------------------------------

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        def insert(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            stored = []
            for alert in alerts:
                cursor = conn.execute(
                    "INSERT INTO alerts (agent_id, process_key, severity, rule_id, ts, status, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, '{}')",
                    (
                        alert["agent_id"],
                        alert["process_key"],
                        alert["severity"],
                        alert["rule_id"],
                        alert["ts"],
                        alert["status"],
                    ),
                )
                full = {**alert, "id": str(cursor.lastrowid)}
                conn.execute(
                    "UPDATE alerts SET body = ? WHERE id = ?",
                    (orjson.dumps(full), cursor.lastrowid),
                )
                stored.append(full)
            return stored

        if not alerts:
            return []
        result: list[dict[str, Any]] = await self._write(insert, len(alerts))
        return result

    async def list_alerts(
        self, *, agent_id: str | None, severity: str | None, cursor: str | None, limit: int
    ) -> Page:
        key = decode_cursor(cursor, 1)
        sql = "SELECT body FROM alerts WHERE id < ?"
        params: list[Any] = [int(key[0]) if key else 2**62]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        if severity:
            sql += " AND severity = ?"
            params.append(severity)
        rows = await self._read(
            lambda c: c.execute(sql + " ORDER BY id DESC LIMIT ?", [*params, limit + 1]).fetchall()
        )
        items = [orjson.loads(row[0]) for row in rows]
        return _page(items, limit, lambda item: [int(item["id"])])

    # revocation --------------------------------------------------------------------------

    async def is_revoked(self, fingerprint: str) -> bool:
        row = await self._read(
            lambda c: c.execute("SELECT 1 FROM revocations WHERE fingerprint = ?", (fingerprint,)).fetchone()
        )
        return row is not None

    async def revoke(self, fingerprint: str, *, serial: str, agent_id: str, reason: str) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO revocations (fingerprint, serial, agent_id, reason, revoked_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (fingerprint, serial, agent_id, reason, time.time()),
            )
        )


_ROWS_PER_INSERT = 4000  # 7 parameters a row; SQLite allows 32,766 per statement


@functools.lru_cache(maxsize=64)
def _insert_events_sql(rows: int) -> str:
    values = ",".join(["(?,?,?,?,?,?,?)"] * rows)  # only placeholders are interpolated
    return (
        f"INSERT INTO events (agent_id, seq, ts, kind, pid, received_at, body) VALUES {values} "  # noqa: S608
        "ON CONFLICT (agent_id, seq) DO NOTHING RETURNING seq"
    )


def _upsert_processes(conn: sqlite3.Connection, states: list[dict[str, Any]]) -> None:
    conn.executemany(
        "INSERT INTO processes (process_key, agent_id, pid, start_ts, risk_score, exited, updated_ts, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (process_key) DO UPDATE SET "
        "risk_score = excluded.risk_score, exited = excluded.exited, "
        "updated_ts = excluded.updated_ts, state = excluded.state",
        [
            (
                s["process_key"],
                s["agent_id"],
                s["pid"],
                s["start_ts"],
                s["risk_score"],
                int(s["exited"]),
                s["updated_ts"],
                orjson.dumps(s),
            )
            for s in states
        ],
    )


def _agent_view(row: dict[str, Any]) -> dict[str, Any]:
    heartbeat = row.pop("heartbeat", None)
    row["heartbeat"] = orjson.loads(heartbeat) if heartbeat else None
    return row


def _page(items: list[dict[str, Any]], limit: int, key: Callable[[dict[str, Any]], list[Any]]) -> Page:
    if len(items) > limit:
        items = items[:limit]
        return Page(items, encode_cursor(key(items[-1])))
    return Page(items, None)
