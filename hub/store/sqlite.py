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
import fcntl
import functools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import orjson

from hub.models import SEVERITY_ORDER, Event, score_view
from hub.problems import Unavailable
from hub.store import EventBatch, EventFilter, Notice, Page

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


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so an acked event survives a power cut.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # How long a statement waits for a lock another process holds before failing; a failed
    # write is answered `unavailable`, and the agent keeps its batch and retries.
    conn.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
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

    def __init__(
        self,
        path: Path,
        *,
        commit_max_events: int = 5_000,
        retry_after_ms: int = 1000,
        busy_timeout_s: float = 30.0,
        on_commit: Callable[[int, float], None] | None = None,
        agent_groups: Mapping[str, list[str]] | None = None,
    ):
        self._path = path
        self._on_commit = on_commit  # told each group commit's size (writes) and seconds
        self._busy_timeout_s = busy_timeout_s
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
        # Group -> agent id globs: webhook subscriptions filtered by group receive their agents' notices.
        self._agent_groups: Mapping[str, list[str]] = dict(agent_groups or {})

    # lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        loop = asyncio.get_running_loop()
        self._writer_conn = await loop.run_in_executor(self._write_thread, self._open_writer)
        # Checkpoints run in their own thread, beside the writer: an automatic checkpoint
        # inside COMMIT would stall every ack waiting on that commit.
        self._writer_conn.execute("PRAGMA wal_autocheckpoint=0")
        timeout = self._busy_timeout_s
        self._reader_conn = await loop.run_in_executor(self._read_thread, _connect, self._path, timeout)
        self._checkpoint_conn = await loop.run_in_executor(
            self._checkpoint_thread, _connect, self._path, timeout
        )
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="sqlite-checkpoint")

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
                started = time.perf_counter()
                outcomes = await loop.run_in_executor(self._write_thread, self._run_group, group)
                if self._on_commit is not None:
                    self._on_commit(size, time.perf_counter() - started)
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

    async def list_events(self, filters: EventFilter, *, after: list[Any] | None, limit: int) -> Page:
        sql = "SELECT agent_id, seq, received_at, body FROM events WHERE (agent_id, seq) > (?, ?)"
        params: list[Any] = list(after) if after else ["", 0]
        for column, operator, value in filters.conditions():
            sql += f" AND {column} {operator} ?"
            params.append(value)
        sql += " ORDER BY agent_id, seq LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, [*params, limit + 1]).fetchall())
        items = [{"agent_id": agent_id, **msgpack.unpackb(body), "received_at": received_at}
                 for agent_id, _, received_at, body in rows]  # fmt: skip
        return _page(items, limit, lambda item: [item["agent_id"], item["seq"]])

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

    async def save_agent(
        self, agent_id: str, fields: dict[str, Any], notices: list[Notice] | None = None
    ) -> None:
        names = list(fields)
        values = [orjson.dumps(v).decode() if isinstance(v, dict) else v for v in fields.values()]
        sql = (
            f"INSERT INTO agents (agent_id, {', '.join(names)}) VALUES (?{', ?' * len(names)}) "  # noqa: S608 - column names come from code, never from input
            f"ON CONFLICT (agent_id) DO UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in names)}"
        )
        beat = fields.get("heartbeat")

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(sql, [agent_id, *values])
            if beat is not None:
                conn.execute(
                    _INSERT_HEARTBEAT_SQL,
                    [agent_id, fields["last_seen"], *(beat.get(name) for name in _HEARTBEAT_COLUMNS)],
                )
            _enqueue(conn, notices or [], time.time(), self._agent_groups)

        await self._write(save)

    async def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        rows = await self._read(lambda c: _rows(c, _AGENTS_SQL + " WHERE agent_id = ?", [agent_id]))
        return _agent_view(rows[0]) if rows else None

    async def list_agents(
        self, *, status: str | None, risk_min: float = 0.0, after: list[Any] | None, limit: int
    ) -> Page:
        sql = _AGENTS_SQL + " WHERE agent_id > ?"
        params: list[Any] = [after[0] if after else ""]
        if status:
            sql += " AND status = ?"
            params.append(status)
        if risk_min > 0:
            sql += " AND risk >= ?"
            params.append(risk_min)
        sql += " ORDER BY agent_id LIMIT ?"
        rows = await self._read(lambda c: _rows(c, sql, [*params, limit + 1]))
        return _page([_agent_view(row) for row in rows], limit, lambda item: [item["agent_id"]])

    async def agents_by_attention(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: _rows(c, _AGENTS_BY_ATTENTION_SQL, [limit]))
        return [_agent_view(row) for row in rows]

    async def count_agents(self) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM agents GROUP BY status"
        rows = await self._read(lambda c: c.execute(sql).fetchall())
        return {"online": 0, "late": 0, "offline": 0} | dict(rows)

    async def list_heartbeats(
        self, agent_id: str, *, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> Page:
        sql = f"SELECT ts, {', '.join(_HEARTBEAT_COLUMNS)} FROM heartbeats WHERE agent_id = ? AND ts > ?"  # noqa: S608 - column names come from code
        params: list[Any] = [agent_id, after[0] if after else -1.0e300]
        for condition, value in (("ts >= ?", since), ("ts < ?", until)):
            if value is not None:
                sql += f" AND {condition}"
                params.append(value)
        rows = await self._read(lambda c: _rows(c, sql + " ORDER BY ts LIMIT ?", [*params, limit + 1]))
        return _page(rows, limit, lambda row: [row["ts"]])

    async def prune_heartbeats(self, before: float) -> int:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM heartbeats WHERE ts < ?", (before,)).rowcount
        )
        return deleted

    async def mark_all_offline(self, reason: str, now: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE agents SET status = 'offline', status_reason = ?, status_changed_at = ? "
                "WHERE status != 'offline'",
                (reason, now),
            )
        )

    # processes and scores ----------------------------------------------------------------

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
        self,
        *,
        risk_min: float,
        agent_id: str | None,
        after: list[Any] | None,
        limit: int,
        live_only: bool = False,
    ) -> Page:
        key = after
        sql = "SELECT state FROM processes WHERE risk_score >= ?"
        params: list[Any] = [risk_min]
        if live_only:
            sql += " AND exited = 0"
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

    async def list_processes(
        self, *, risk_min: float, agent_id: str | None, live: bool | None, after: list[Any] | None, limit: int
    ) -> Page:
        sql = "SELECT state FROM processes WHERE process_key > ? AND risk_score >= ?"
        params: list[Any] = [after[0] if after else "", risk_min]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        if live is not None:
            sql += " AND exited = ?"
            params.append(int(not live))
        sql += " ORDER BY process_key LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, [*params, limit + 1]).fetchall())
        return _page([orjson.loads(row[0]) for row in rows], limit, lambda item: [item["process_key"]])

    async def get_process(self, process_key: str) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT state FROM processes WHERE process_key = ?", (process_key,)
            ).fetchone()
        )
        return orjson.loads(row[0]) if row else None

    async def process_tree(
        self, process_key: str, *, ancestors: int, descendants: int, limit: int
    ) -> list[dict[str, Any]] | None:
        return await self._read(lambda c: _process_tree(c, process_key, ancestors, descendants, limit))

    # alerts ------------------------------------------------------------------------------

    async def insert_alerts(
        self,
        alerts: list[dict[str, Any]],
        notices: Callable[[dict[str, Any]], list[Notice]] | None = None,
        *,
        processes: list[dict[str, Any]] | None = None,
        forward_to_siem: bool = False,
        siem_events: list[dict[str, Any]] | None = None,
        suppression_window_s: float = 0.0,
    ) -> list[dict[str, Any]]:
        announce = _Announce(notices, forward_to_siem, self._agent_groups)
        processes, siem_events = processes or [], siem_events or []

        def save(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            _upsert_processes(conn, processes)
            _queue_siem(conn, "event", siem_events, time.time())
            return [_insert_alert(conn, alert, announce, suppression_window_s) for alert in alerts]

        if not processes and not alerts and not siem_events:
            return []
        result: list[dict[str, Any]] = await self._write(
            save, len(processes) + len(alerts) + len(siem_events)
        )
        return result

    async def list_alerts(
        self,
        *,
        agent_id: str | None,
        severity: str | None,
        status: str | None = None,
        fingerprint: str | None = None,
        after: list[Any] | None,
        limit: int,
    ) -> Page:
        sql = "SELECT body FROM alerts WHERE id < ?"
        params: list[Any] = [int(after[0]) if after else 2**62]
        filters = (
            ("agent_id", agent_id),
            ("severity", severity),
            ("status", status),
            ("fingerprint", fingerprint),
        )
        for column, value in filters:
            if value:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = await self._read(
            lambda c: c.execute(sql + " ORDER BY id DESC LIMIT ?", [*params, limit + 1]).fetchall()
        )
        items = [orjson.loads(row[0]) for row in rows]
        return _page(items, limit, lambda item: [int(item["id"])])

    async def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        )
        return orjson.loads(row[0]) if row else None

    async def set_alert_status(
        self, alert_id: int, status: str, change: dict[str, Any], *, allowed_from: tuple[str, ...]
    ) -> dict[str, Any] | None:
        def update(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if row is None:
                return None
            alert: dict[str, Any] = orjson.loads(row[0])
            if alert["status"] not in allowed_from:
                return alert
            alert.update(change, status=status)
            conn.execute(
                "UPDATE alerts SET status = ?, body = ? WHERE id = ?", (status, orjson.dumps(alert), alert_id)
            )
            return alert

        result: dict[str, Any] | None = await self._write(update)
        return result

    # agent signing secrets ---------------------------------------------------------------

    async def get_agent_secret(self, agent_id: str) -> str | None:
        row = await self._read(
            lambda c: c.execute("SELECT secret FROM agent_secrets WHERE agent_id = ?", (agent_id,)).fetchone()
        )
        return str(row[0]) if row else None

    async def set_agent_secret(self, agent_id: str, secret: str | None) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            if secret is None:
                return conn.execute("DELETE FROM agent_secrets WHERE agent_id = ?", (agent_id,)).rowcount > 0
            conn.execute(
                "INSERT OR REPLACE INTO agent_secrets (agent_id, secret, created_at) VALUES (?, ?, ?)",
                (agent_id, secret, time.time()),
            )
            return True

        changed: bool = await self._write(write)
        return changed

    # idempotency -------------------------------------------------------------------------

    async def get_idempotent(self, owner: str, key: str, now: float) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT request_hash, status, content_type, body, location FROM idempotency "
                "WHERE owner = ? AND key = ? AND expires_at > ?",
                (owner, key, now),
            ).fetchone()
        )
        if row is None:
            return None
        return {
            "request_hash": row[0],
            "status": row[1],
            "content_type": row[2],
            "body": row[3],
            "location": row[4],
        }

    async def save_idempotent(self, owner: str, key: str, answer: dict[str, Any], expires_at: float) -> None:
        def save(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (time.time(),))
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (owner, key, request_hash, status, content_type, body, "
                "location, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (owner, key, answer["request_hash"], answer["status"], answer["content_type"], answer["body"],
                 answer["location"], expires_at),
            )  # fmt: skip

        await self._write(save)

    # audit log and operator token revocation ---------------------------------------------

    async def append_audit(self, link: Callable[[int, str | None], dict[str, Any]]) -> dict[str, Any]:
        def append(conn: sqlite3.Connection) -> dict[str, Any]:
            # Inside the writer's BEGIN IMMEDIATE: no connection, in this process or another,
            # can append between this read and the insert, so the chain cannot fork.
            last = conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
            entry = link(last[0], last[1]) if last else link(0, None)
            conn.execute(
                "INSERT INTO audit_log (id, ts, actor, token_id, action, method, path, target, status, "
                "correlation_id, client, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry["id"], entry["ts"], entry["actor"], entry["token_id"], entry["action"],
                 entry["method"], entry["path"], orjson.dumps(entry["target"]).decode(), entry["status"],
                 entry["correlation_id"], entry["client"], entry["prev_hash"], entry["hash"]),
            )  # fmt: skip
            return entry

        result: dict[str, Any] = await self._write(append)
        return result

    async def audit_entries(self, *, after_id: int, limit: int) -> list[dict[str, Any]]:
        return await self._audit_rows(
            "SELECT * FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", [after_id, limit]
        )

    async def list_audit(
        self,
        *,
        actor: str | None,
        action: str | None,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> Page:
        sql = "SELECT * FROM audit_log WHERE id < ?"
        params: list[Any] = [int(after[0]) if after else 2**62]
        for condition, value in (("actor = ?", actor), ("action = ?", action), ("ts >= ?", since),
                                 ("ts < ?", until)):  # fmt: skip
            if value is not None:
                sql += f" AND {condition}"
                params.append(value)
        items = await self._audit_rows(sql + " ORDER BY id DESC LIMIT ?", [*params, limit + 1])
        return _page(items, limit, lambda item: [item["id"]])

    async def _audit_rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: _rows(c, sql, params))
        return [{**row, "target": orjson.loads(row["target"])} for row in rows]

    async def revoke_token(self, jti: str, *, reason: str, revoked_at: float) -> dict[str, Any]:
        def revoke(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute(
                "INSERT OR IGNORE INTO revoked_tokens (jti, revoked_at, reason) VALUES (?, ?, ?)",
                (jti, revoked_at, reason),
            )
            return _rows(conn, "SELECT jti, revoked_at, reason FROM revoked_tokens WHERE jti = ?", [jti])[0]

        result: dict[str, Any] = await self._write(revoke)
        return result

    async def get_revoked_token(self, jti: str) -> dict[str, Any] | None:
        rows = await self._read(
            lambda c: _rows(c, "SELECT jti, revoked_at, reason FROM revoked_tokens WHERE jti = ?", [jti])
        )
        return rows[0] if rows else None

    # agent certificates ------------------------------------------------------------------

    # Revocation state comes from `revocations`, which holds every revoked fingerprint.
    _CERTIFICATES_SQL = (
        "SELECT * FROM (SELECT certificates.*, revocations.revoked_at, "
        "revocations.reason AS revocation_reason FROM certificates LEFT JOIN revocations USING (fingerprint))"
    )

    async def save_certificate(self, record: dict[str, Any]) -> dict[str, Any]:
        names = list(record)

        def save(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute(
                f"INSERT INTO certificates ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "  # noqa: S608 - column names come from code, never from input
                "ON CONFLICT (fingerprint) DO UPDATE SET source = 'uploaded' "
                "WHERE excluded.source = 'uploaded'",
                list(record.values()),
            )
            return _rows(conn, self._CERTIFICATES_SQL + " WHERE fingerprint = ?", [record["fingerprint"]])[0]

        stored: dict[str, Any] = await self._write(save)
        return stored

    async def get_certificate(self, fingerprint: str) -> dict[str, Any] | None:
        rows = await self._read(
            lambda c: _rows(c, self._CERTIFICATES_SQL + " WHERE fingerprint = ?", [fingerprint])
        )
        return rows[0] if rows else None

    async def list_certificates(
        self, *, agent_id: str | None, status: str | None, now: float, after: list[Any] | None, limit: int
    ) -> Page:
        sql = self._CERTIFICATES_SQL + " WHERE (not_after, fingerprint) > (?, ?)"
        params: list[Any] = list(after) if after else [-1.0e300, ""]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        if status == "revoked":
            sql += " AND revoked_at IS NOT NULL"
        elif status is not None:
            sql += " AND revoked_at IS NULL AND not_after " + ("<= ?" if status == "expired" else "> ?")
            params.append(now)
        sql += " ORDER BY not_after, fingerprint LIMIT ?"
        rows = await self._read(lambda c: _rows(c, sql, [*params, limit + 1]))
        return _page(rows, limit, lambda item: [item["not_after"], item["fingerprint"]])

    async def notify_expiring_certificates(
        self, *, now: float, until: float, notice: Callable[[dict[str, Any]], Notice]
    ) -> int:
        def notify(conn: sqlite3.Connection) -> int:
            # Marked and queued in one transaction: several nodes checking at once announce it once.
            due = _rows(
                conn,
                self._CERTIFICATES_SQL + " WHERE revoked_at IS NULL AND expiry_notified_at IS NULL "
                "AND not_after > ? AND not_after <= ? ORDER BY not_after",
                [now, until],
            )
            for record in due:
                conn.execute(
                    "UPDATE certificates SET expiry_notified_at = ? WHERE fingerprint = ?",
                    (now, record["fingerprint"]),
                )
                _enqueue(conn, [notice(record)], now, self._agent_groups)
            return len(due)

        count: int = await self._write(notify)
        return count

    async def uploaded_certificates(self, now: float) -> list[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT pem FROM certificates WHERE source = 'uploaded' AND not_after > ?", (now,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    # commands ----------------------------------------------------------------------------

    async def insert_command(self, command: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        def insert(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            cursor = conn.execute(
                f"INSERT INTO commands ({', '.join(_COMMAND_COLUMNS)}) "  # noqa: S608 - column names come from code
                f"VALUES ({', '.join('?' * len(_COMMAND_COLUMNS))}) ON CONFLICT (id) DO NOTHING",
                [_command_value(name, command[name]) for name in _COMMAND_COLUMNS],
            )
            stored = _rows(conn, "SELECT * FROM commands WHERE id = ?", [command["id"]])[0]
            return _command_view(stored), cursor.rowcount == 1

        result: tuple[dict[str, Any], bool] = await self._write(insert)
        return result

    async def get_command(self, command_id: str) -> dict[str, Any] | None:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM commands WHERE id = ?", [command_id]))
        return _command_view(rows[0]) if rows else None

    async def list_commands(
        self, agent_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        sql = "SELECT * FROM commands WHERE agent_id = ? AND seq < ?"
        params: list[Any] = [agent_id, int(after[0]) if after else 2**62]
        if state:
            sql += " AND state = ?"
            params.append(state)
        rows = await self._read(lambda c: _rows(c, sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1]))
        page = _page(rows, limit, lambda row: [row["seq"]])
        return Page([_command_view(row) for row in page.items], page.next_key)

    async def queued_commands(self, agent_id: str, now: float) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda c: _rows(
                c,
                "SELECT * FROM commands WHERE agent_id = ? AND state = 'queued' AND expires_at > ? "
                "ORDER BY seq",
                [agent_id, now],
            )
        )
        return [_command_view(row) for row in rows]

    async def transition_command(
        self, command_id: str, *, expect: tuple[str, ...], changes: dict[str, Any]
    ) -> dict[str, Any] | None:
        sql = (
            f"UPDATE commands SET {', '.join(f'{name} = ?' for name in changes)} "  # noqa: S608 - names come from code
            f"WHERE id = ? AND state IN ({', '.join('?' * len(expect))}) RETURNING *"
        )
        params = [*(_command_value(name, value) for name, value in changes.items()), command_id, *expect]
        rows: list[dict[str, Any]] = await self._write(lambda c: _rows(c, sql, params))
        return _command_view(rows[0]) if rows else None

    async def expire_commands(self, now: float, errors: dict[str, str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._write(
            lambda c: _rows(
                c,
                "UPDATE commands SET state = 'expired', completed_at = ?, "
                "error = CASE state WHEN 'queued' THEN ? ELSE ? END "
                "WHERE state IN ('queued', 'delivered') AND expires_at <= ? RETURNING *",
                [now, errors["queued"], errors["delivered"], now],
            )
        )
        return [_command_view(row) for row in sorted(rows, key=lambda row: row["seq"])]

    # webhooks ----------------------------------------------------------------------------

    async def insert_webhook(self, record: dict[str, Any], *, max_count: int) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            # Counted in the same transaction: concurrent creations cannot pass the limit together.
            if conn.execute("SELECT count(*) FROM webhooks").fetchone()[0] >= max_count:
                return False
            conn.execute(
                f"INSERT INTO webhooks ({', '.join(_WEBHOOK_COLUMNS)}) "  # noqa: S608 - column names come from code
                f"VALUES ({', '.join('?' * len(_WEBHOOK_COLUMNS))})",
                [_webhook_value(name, record[name]) for name in _WEBHOOK_COLUMNS],
            )
            return True

        inserted: bool = await self._write(insert)
        return inserted

    async def get_webhook(self, webhook_id: str) -> dict[str, Any] | None:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM webhooks WHERE id = ?", [webhook_id]))
        return _webhook_record(rows[0]) if rows else None

    async def list_webhooks(self, *, after: list[Any] | None, limit: int) -> Page:
        sql = "SELECT * FROM webhooks WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = await self._read(lambda c: _rows(c, sql, [int(after[0]) if after else 0, limit + 1]))
        page = _page(rows, limit, lambda row: [row["seq"]])
        return Page([_webhook_record(row) for row in page.items], page.next_key)

    async def update_webhook(
        self, webhook_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any] | None:
        def update(conn: sqlite3.Connection) -> dict[str, Any] | None:
            rows = _rows(conn, "SELECT * FROM webhooks WHERE id = ?", [webhook_id])
            if not rows:
                return None
            changes = change(_webhook_record(rows[0]))
            if not changes or not set(changes) <= set(_WEBHOOK_COLUMNS):
                raise ValueError(f"cannot change webhook columns {sorted(changes)}")
            updated = _rows(
                conn,
                f"UPDATE webhooks SET {', '.join(f'{name} = ?' for name in changes)} "  # noqa: S608 - names checked above
                "WHERE id = ? RETURNING *",
                [*(_webhook_value(name, value) for name, value in changes.items()), webhook_id],
            )
            return _webhook_record(updated[0])

        result: dict[str, Any] | None = await self._write(update)
        return result

    async def delete_webhook(self, webhook_id: str) -> bool:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount
        )
        return deleted == 1

    # webhook deliveries (the outbox) -----------------------------------------------------

    async def enqueue_delivery(self, webhook_id: str, notice: Notice, now: float) -> dict[str, Any] | None:
        def enqueue(conn: sqlite3.Connection) -> dict[str, Any] | None:
            if conn.execute("SELECT 1 FROM webhooks WHERE id = ?", (webhook_id,)).fetchone() is None:
                return None
            delivery_id = _insert_delivery(conn, webhook_id, notice, now)
            return _rows(conn, _DELIVERIES_SQL + " WHERE id = ?", [delivery_id])[0]

        result: dict[str, Any] | None = await self._write(enqueue)
        return result

    async def claim_deliveries(
        self, *, now: float, node: str, lease_s: float, limit: int
    ) -> list[dict[str, Any]]:
        def claim(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            # Inside the writer's BEGIN IMMEDIATE: nodes sharing the database claim one at a time.
            rows = _rows(conn, _CLAIM_SQL, [now, now, limit])
            conn.executemany(
                "UPDATE webhook_deliveries SET lease_until = ?, lease_node = ? WHERE id = ?",
                [(now + lease_s, node, row["id"]) for row in rows],
            )
            return rows

        claimed: list[dict[str, Any]] = await self._write(claim)
        return claimed

    async def finish_delivery(self, delivery_id: str, node: str, changes: dict[str, Any]) -> bool:
        if not changes or not set(changes) <= _DELIVERY_OUTCOME:
            raise ValueError(f"cannot change delivery columns {sorted(changes)}")
        sql = (
            f"UPDATE webhook_deliveries SET {', '.join(f'{name} = ?' for name in changes)}, "  # noqa: S608 - names checked above
            "lease_until = NULL, lease_node = NULL WHERE id = ? AND lease_node = ? AND state = 'pending'"
        )
        updated: int = await self._write(
            lambda c: c.execute(sql, [*changes.values(), delivery_id, node]).rowcount
        )
        return updated == 1

    async def release_leases(self, node: str) -> int:
        released: int = await self._write(
            lambda c: (
                c.execute(
                    "UPDATE webhook_deliveries SET lease_until = NULL, lease_node = NULL "
                    "WHERE lease_node = ?",
                    (node,),
                ).rowcount
            )
        )
        return released

    async def count_deliveries(self) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM webhook_deliveries GROUP BY state"
        rows = await self._read(lambda c: c.execute(sql).fetchall())
        return {"pending": 0, "delivered": 0, "dead": 0} | dict(rows)

    async def prune_deliveries(self, before: float) -> int:
        sql = "DELETE FROM webhook_deliveries WHERE created_at < ? AND state != 'pending'"
        deleted: int = await self._write(lambda c: c.execute(sql, (before,)).rowcount)
        return deleted

    async def next_delivery_at(self, *, now: float) -> float | None:
        sql = (
            "SELECT min(next_attempt_at) FROM webhook_deliveries AS d WHERE state = 'pending' "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS f WHERE f.webhook_id = d.webhook_id "
            "AND f.state = 'pending' AND f.lease_until > ?)"
        )
        row = await self._read(lambda c: c.execute(sql, (now,)).fetchone())
        return None if row[0] is None else float(row[0])

    async def list_deliveries(
        self, webhook_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        sql = _DELIVERIES_SQL + " WHERE webhook_id = ? AND seq < ?"
        params: list[Any] = [webhook_id, int(after[0]) if after else 2**62]
        if state:
            sql += " AND state = ?"
            params.append(state)
        rows = await self._read(lambda c: _rows(c, sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1]))
        page = _page(rows, limit, lambda row: [row["seq"]])
        return Page([_delivery_view(row) for row in page.items], page.next_key)

    async def redeliver(
        self, webhook_id: str, delivery_id: str, now: float
    ) -> tuple[dict[str, Any], bool] | None:
        def redeliver(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool] | None:
            changed = conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "delivered_at = NULL, lease_until = NULL, lease_node = NULL "
                "WHERE id = ? AND webhook_id = ? AND state != 'pending'",
                (now, delivery_id, webhook_id),
            ).rowcount
            rows = _rows(
                conn, _DELIVERIES_SQL + " WHERE id = ? AND webhook_id = ?", [delivery_id, webhook_id]
            )
            return (_delivery_view(rows[0]), changed == 1) if rows else None

        result: tuple[dict[str, Any], bool] | None = await self._write(redeliver)
        return result

    async def delivery_summaries(self, webhook_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not webhook_ids:
            return {}
        # The last attempt of each subscription, and its pending and dead counts.
        sql = (
            "SELECT webhook_id, sum(state = 'pending') AS pending, sum(state = 'dead') AS dead, "
            "max(last_attempt_at) AS last_delivery_at, "
            "(SELECT last_status FROM webhook_deliveries AS latest WHERE latest.webhook_id = d.webhook_id "
            "AND latest.last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1) AS last_status "
            "FROM webhook_deliveries AS d WHERE webhook_id IN (SELECT value FROM json_each(?)) "
            "GROUP BY webhook_id"
        )
        rows = await self._read(lambda c: _rows(c, sql, [orjson.dumps(webhook_ids).decode()]))
        found = {row.pop("webhook_id"): row for row in rows}
        return {webhook_id: found.get(webhook_id, dict(_NO_DELIVERIES)) for webhook_id in webhook_ids}

    # operator accounts and web sessions --------------------------------------------------

    async def insert_user(self, record: dict[str, Any]) -> bool:
        if not set(record) <= set(_USER_COLUMNS):
            raise ValueError(f"unknown user columns {sorted(set(record) - set(_USER_COLUMNS))}")
        names = list(record)

        def insert(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                f"INSERT INTO users ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "  # noqa: S608 - column names come from code
                "ON CONFLICT (name) DO NOTHING",
                [record[name] for name in names],
            )
            return cursor.rowcount == 1

        inserted: bool = await self._write(insert)
        return inserted

    async def get_user(self, name: str) -> dict[str, Any] | None:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM users WHERE name = ?", [name]))
        return rows[0] if rows else None

    async def list_users(self) -> list[dict[str, Any]]:
        columns = ", ".join(name for name in _USER_COLUMNS if name != "password_hash")
        return await self._read(lambda c: _rows(c, f"SELECT {columns} FROM users ORDER BY name", []))  # noqa: S608 - column names come from code

    async def update_user(self, name: str, fields: dict[str, Any]) -> bool:
        if not fields or not set(fields) <= _USER_CHANGEABLE:
            raise ValueError(f"cannot change user columns {sorted(set(fields) - _USER_CHANGEABLE)}")
        sql = f"UPDATE users SET {', '.join(f'{n} = ?' for n in fields)} WHERE name = ?"  # noqa: S608 - names checked above
        updated: int = await self._write(lambda c: c.execute(sql, [*fields.values(), name]).rowcount)
        return updated == 1

    async def add_signin_failure(self, name: str) -> int | None:
        rows = await self._write(
            lambda c: c.execute(
                "UPDATE users SET failed_signins = failed_signins + 1 WHERE name = ? "
                "RETURNING failed_signins",
                (name,),
            ).fetchall()
        )
        return int(rows[0][0]) if rows else None

    async def delete_user(self, name: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            return conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 1

        deleted: bool = await self._write(delete)
        return deleted

    async def insert_session(self, record: dict[str, Any]) -> None:
        values = [record.get(name) for name in _SESSION_COLUMNS]
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO sessions ({', '.join(_SESSION_COLUMNS)}) "  # noqa: S608 - column names come from code
                f"VALUES ({', '.join('?' * len(_SESSION_COLUMNS))})",
                values,
            )
        )

    async def get_session(self, id_hash: str) -> dict[str, Any] | None:
        rows = await self._read(
            lambda c: _rows(
                c,
                "SELECT sessions.*, users.role FROM sessions JOIN users ON users.name = sessions.user_name "
                "WHERE id_hash = ?",
                [id_hash],
            )
        )
        return rows[0] if rows else None

    async def touch_session(self, id_hash: str, *, last_seen_at: float, expires_at: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE sessions SET last_seen_at = ?, expires_at = ? WHERE id_hash = ?",
                (last_seen_at, expires_at, id_hash),
            )
        )

    async def delete_session(self, id_hash: str) -> bool:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)).rowcount
        )
        return deleted == 1

    async def delete_sessions(self, user_name: str) -> int:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM sessions WHERE user_name = ?", (user_name,)).rowcount
        )
        return deleted

    async def prune_sessions(self, now: float) -> int:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount
        )
        return deleted

    # revocation --------------------------------------------------------------------------

    async def is_revoked(self, fingerprint: str) -> bool:
        row = await self._read(
            lambda c: c.execute("SELECT 1 FROM revocations WHERE fingerprint = ?", (fingerprint,)).fetchone()
        )
        return row is not None

    async def revoke(
        self,
        fingerprint: str,
        *,
        serial: str,
        agent_id: str,
        reason: str,
        notices: list[Notice] | None = None,
    ) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cursor = conn.execute(
                "INSERT OR IGNORE INTO revocations (fingerprint, serial, agent_id, reason, revoked_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (fingerprint, serial, agent_id, reason, now),
            )
            if cursor.rowcount != 1:
                return False
            _enqueue(conn, notices or [], now, self._agent_groups)
            return True

        new: bool = await self._write(revoke)
        return new

    # SIEM forwarding (its own queue) ---------------------------------------------------------

    async def claim_siem(
        self, *, now: float, node: str, lease_s: float, limit: int, filled_before: float
    ) -> tuple[str, list[dict[str, Any]]] | None:
        def claim(conn: sqlite3.Connection) -> tuple[str, list[dict[str, Any]]] | None:
            # Inside the writer's BEGIN IMMEDIATE: nodes sharing the database claim one at a time.
            for kind in ("alert", "event"):  # alerts first: an event backlog never holds them up
                rows = _rows(conn, _SIEM_CLAIM_SQL, [kind, now, now, limit])
                if rows and (len(rows) == limit or rows[0]["created_at"] < filled_before):
                    conn.executemany(
                        "UPDATE siem_queue SET lease_until = ?, lease_node = ? WHERE seq = ?",
                        [(now + lease_s, node, row["seq"]) for row in rows],
                    )
                    return kind, rows
            return None

        claimed: tuple[str, list[dict[str, Any]]] | None = await self._write(claim)
        return claimed

    async def finish_siem(self, seqs: list[int]) -> int:
        sql = "DELETE FROM siem_queue WHERE seq IN (SELECT value FROM json_each(?))"
        deleted: int = await self._write(lambda c: c.execute(sql, (orjson.dumps(seqs).decode(),)).rowcount)
        return deleted

    async def retry_siem(self, seqs: list[int], node: str, next_attempt_at: float) -> int:
        sql = (
            "UPDATE siem_queue SET attempts = attempts + 1, next_attempt_at = ?, lease_until = NULL, "
            "lease_node = NULL WHERE seq IN (SELECT value FROM json_each(?)) AND lease_node = ?"
        )
        params = (next_attempt_at, orjson.dumps(seqs).decode(), node)
        updated: int = await self._write(lambda c: c.execute(sql, params).rowcount)
        return updated

    async def release_siem_leases(self, node: str) -> int:
        sql = "UPDATE siem_queue SET lease_until = NULL, lease_node = NULL WHERE lease_node = ?"
        released: int = await self._write(lambda c: c.execute(sql, (node,)).rowcount)
        return released

    async def next_siem_at(self, *, now: float, fill_s: float) -> float | None:
        # The oldest unleased row of each kind says when its batch is due: once it waited
        # `fill_s` for company, and not before its next attempt.
        sql = (
            "SELECT min(max(next_attempt_at, created_at + ?)) FROM (SELECT kind, min(seq) AS seq "
            "FROM siem_queue WHERE lease_until IS NULL OR lease_until <= ? GROUP BY kind) "
            "JOIN siem_queue USING (seq)"
        )
        row = await self._read(lambda c: c.execute(sql, (fill_s, now)).fetchone())
        return None if row[0] is None else float(row[0])

    async def siem_queue_depth(self) -> int:
        row = await self._read(lambda c: c.execute("SELECT count(*) FROM siem_queue").fetchone())
        return int(row[0])

    async def trim_siem_queue(self, max_rows: int) -> int:
        def trim(conn: sqlite3.Connection) -> int:
            over = conn.execute("SELECT count(*) FROM siem_queue").fetchone()[0] - max_rows
            if over <= 0:
                return 0
            return conn.execute(
                "DELETE FROM siem_queue WHERE seq IN "
                "(SELECT seq FROM siem_queue WHERE kind = 'event' ORDER BY seq LIMIT ?)",
                (over,),
            ).rowcount

        dropped: int = await self._write(trim)
        return dropped

    # agent throttles ---------------------------------------------------------------------

    async def set_throttle(self, record: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        def save(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute(_REPLACE_THROTTLE_SQL if replace else _KEEP_THROTTLE_SQL, record)
            return _rows(conn, "SELECT * FROM agent_throttles WHERE agent_id = ?", [record["agent_id"]])[0]

        stored: dict[str, Any] = await self._write(save)
        return stored

    async def get_throttle(self, agent_id: str) -> dict[str, Any] | None:
        sql = "SELECT * FROM agent_throttles WHERE agent_id = ?"
        rows = await self._read(lambda c: _rows(c, sql, [agent_id]))
        return rows[0] if rows else None

    async def list_throttles(self) -> list[dict[str, Any]]:
        return await self._read(lambda c: _rows(c, "SELECT * FROM agent_throttles ORDER BY agent_id", []))

    async def delete_throttle(self, agent_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM agent_throttles WHERE agent_id = ?", (agent_id,)).rowcount > 0

        deleted: bool = await self._write(delete)
        return deleted


_KEEP_THROTTLE_SQL = (
    "INSERT INTO agent_throttles (agent_id, events_per_s, reason, throttled_at, throttled_by) "
    "VALUES (:agent_id, :events_per_s, :reason, :throttled_at, :throttled_by) "
    "ON CONFLICT (agent_id) DO NOTHING"
)
_REPLACE_THROTTLE_SQL = _KEEP_THROTTLE_SQL.removesuffix("NOTHING") + (
    "UPDATE SET events_per_s = excluded.events_per_s, reason = excluded.reason, "
    "throttled_at = excluded.throttled_at, throttled_by = excluded.throttled_by"
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
        "INSERT INTO processes (process_key, agent_id, pid, start_ts, ppid, risk_score, exited, updated_ts, "
        "state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (process_key) DO UPDATE SET "
        "ppid = excluded.ppid, risk_score = excluded.risk_score, exited = excluded.exited, "
        "updated_ts = excluded.updated_ts, state = excluded.state",
        [
            (
                s["process_key"],
                s["agent_id"],
                s["pid"],
                s["start_ts"],
                s["ppid"],
                s["risk_score"],
                int(s["exited"]),
                s["updated_ts"],
                orjson.dumps(s),
            )
            for s in states
        ],
    )


# A process's parent is the newest process of its agent with its ppid that started no later
# than it: pids are reused, so an older holder of that pid may be in the table too.
_PARENT_SQL = (
    "SELECT state FROM processes WHERE agent_id = ? AND pid = ? AND start_ts <= ? AND process_key != ? "
    "ORDER BY start_ts DESC LIMIT 1"
)
# The same rule seen from the parent: no newer holder of its pid started before the child.
_CHILDREN_SQL = (
    "SELECT state FROM processes AS child WHERE agent_id = ? AND ppid = ? AND start_ts >= ? "
    "AND process_key != ? AND NOT EXISTS (SELECT 1 FROM processes AS other WHERE "
    "other.agent_id = child.agent_id AND other.pid = child.ppid AND other.start_ts > ? "
    "AND other.start_ts <= child.start_ts AND other.process_key != child.process_key) "
    "ORDER BY start_ts, process_key LIMIT ?"
)


def _process_tree(
    conn: sqlite3.Connection, process_key: str, ancestors: int, descendants: int, limit: int
) -> list[dict[str, Any]] | None:
    row = conn.execute("SELECT state FROM processes WHERE process_key = ?", (process_key,)).fetchone()
    if row is None:
        return None
    process = {**orjson.loads(row[0]), "parent_key": None}
    seen = {process_key}  # bad data could make a cycle: no process is taken twice
    chain = _ancestors(conn, process, ancestors, seen)
    return chain + _descendants(conn, process, descendants, limit - len(chain), seen)


def _ancestors(
    conn: sqlite3.Connection, process: dict[str, Any], levels: int, seen: set[str]
) -> list[dict[str, Any]]:
    """`process` and up to `levels` of its ancestors, the topmost first."""
    chain = [process]
    while len(chain) <= levels and (child := chain[-1])["ppid"] is not None:
        params = (child["agent_id"], child["ppid"], child["start_ts"], child["process_key"])
        row = conn.execute(_PARENT_SQL, params).fetchone()
        parent = orjson.loads(row[0]) if row else None
        if parent is None or parent["process_key"] in seen:
            break
        child["parent_key"] = parent["process_key"]
        seen.add(parent["process_key"])
        chain.append({**parent, "parent_key": None})
    return chain[::-1]


def _descendants(
    conn: sqlite3.Connection, process: dict[str, Any], levels: int, room: int, seen: set[str]
) -> list[dict[str, Any]]:
    """Up to `room` descendants of `process`, `levels` deep at most, level by level."""
    found: list[dict[str, Any]] = []
    level = [process]
    for _ in range(levels):
        below: list[dict[str, Any]] = []
        for node in level:
            if len(found) >= room:
                return found
            key, start_ts = node["process_key"], node["start_ts"]
            params = (node["agent_id"], node["pid"], start_ts, key, start_ts, room - len(found))
            for (state,) in conn.execute(_CHILDREN_SQL, params).fetchall():
                child = {**orjson.loads(state), "parent_key": key}
                if child["process_key"] not in seen:
                    seen.add(child["process_key"])
                    below.append(child)
                    found.append(child)
        level = below
    return found


# An agent's risk is the highest of its live processes.
_AGENTS_SQL = (
    "SELECT * FROM (SELECT agents.*, coalesce(live.risk, 0.0) AS risk FROM agents LEFT JOIN "
    "(SELECT agent_id, max(risk_score) AS risk FROM processes WHERE exited = 0 GROUP BY agent_id) AS live "
    "USING (agent_id))"
)
_AGENTS_BY_ATTENTION_SQL = (
    _AGENTS_SQL
    + " ORDER BY CASE status WHEN 'offline' THEN 0 WHEN 'late' THEN 1 ELSE 2 END, risk DESC, agent_id LIMIT ?"
)


def _rows(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _agent_view(row: dict[str, Any]) -> dict[str, Any]:
    heartbeat = row.pop("heartbeat", None)
    row["heartbeat"] = orjson.loads(heartbeat) if heartbeat else None
    return row


_COMMAND_COLUMNS = ("id", "agent_id", "name", "args", "state", "created_at", "delivered_at", "completed_at",
                    "expires_at", "result", "error", "created_by")  # fmt: skip
_COMMAND_JSON = ("args", "result")  # stored as JSON text


def _command_value(name: str, value: Any) -> Any:
    return orjson.dumps(value).decode() if name in _COMMAND_JSON and value is not None else value


def _command_view(row: dict[str, Any]) -> dict[str, Any]:
    view = {name: row[name] for name in _COMMAND_COLUMNS}  # `seq` is the store's own sort key
    for name in _COMMAND_JSON:
        view[name] = orjson.loads(view[name]) if view[name] is not None else None
    return view


_WEBHOOK_COLUMNS = ("id", "url", "description", "event_types", "min_severity", "routes", "enabled",
                    "secret", "previous_secret", "previous_secret_expires_at", "created_at", "updated_at",
                    "created_by")  # fmt: skip
_WEBHOOK_JSON = frozenset({"event_types", "routes"})


def _webhook_value(name: str, value: Any) -> Any:
    if name in _WEBHOOK_JSON:
        return orjson.dumps(value).decode()
    return int(value) if name == "enabled" else value


def _webhook_record(row: dict[str, Any]) -> dict[str, Any]:
    record = {name: row[name] for name in _WEBHOOK_COLUMNS}  # `seq` is the store's own sort key
    for name in _WEBHOOK_JSON:
        record[name] = orjson.loads(record[name])
    record["enabled"] = bool(record["enabled"])
    return record


_DELIVERY_COLUMNS = ("id", "event_type", "state", "attempts", "next_attempt_at", "last_attempt_at",
                     "last_status", "last_error", "created_at", "delivered_at")  # fmt: skip
_DELIVERIES_SQL = f"SELECT seq, {', '.join(_DELIVERY_COLUMNS)} FROM webhook_deliveries"  # noqa: S608 - column names come from code
_DELIVERY_OUTCOME = frozenset({"state", "attempts", "next_attempt_at", "last_attempt_at", "last_status",
                               "last_error", "delivered_at"})  # fmt: skip
_NO_DELIVERIES = {"pending": 0, "dead": 0, "last_status": None, "last_delivery_at": None}
# Due pending deliveries, the soonest of each subscription that has no attempt in flight (one
# lane per subscription), soonest first; with what an attempt needs from its subscription.
_CLAIM_SQL = (
    "SELECT d.id, d.webhook_id, d.event_type, d.body, d.attempts, min(d.next_attempt_at) AS next_attempt_at, "
    "w.url, w.secret, w.previous_secret, w.previous_secret_expires_at "
    "FROM webhook_deliveries AS d JOIN webhooks AS w ON w.id = d.webhook_id "
    "WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS f WHERE f.webhook_id = d.webhook_id "
    "AND f.state = 'pending' AND f.lease_until > ?) "
    "GROUP BY d.webhook_id ORDER BY next_attempt_at LIMIT ?"
)


def _delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in _DELIVERY_COLUMNS}  # `seq` is the store's own sort key


def _insert_delivery(conn: sqlite3.Connection, webhook_id: str, notice: Notice, now: float) -> str:
    delivery_id = "whd_" + secrets.token_hex(16)
    # The body is fixed now: every attempt, and every duplicate, sends these bytes.
    body = orjson.dumps({"delivery_id": delivery_id, **notice.body})
    conn.execute(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_type, body, state, next_attempt_at, "
        "created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        (delivery_id, webhook_id, notice.event_type, body, now, now),
    )
    return delivery_id


def _enqueue(
    conn: sqlite3.Connection, notices: list[Notice], now: float, agent_groups: Mapping[str, list[str]]
) -> None:
    """Queue a delivery of each notice to every enabled subscription that wants it."""
    if not notices:
        return
    sql = "SELECT id, event_types, min_severity, routes FROM webhooks WHERE enabled = 1"
    for webhook_id, event_types, min_severity, routes in conn.execute(sql).fetchall():
        wanted, routing = orjson.loads(event_types), orjson.loads(routes)
        for notice in notices:
            if (
                notice.event_type in wanted
                and _severe_enough(notice.severity, min_severity)
                and notice.routed(routing, agent_groups)
            ):
                _insert_delivery(conn, webhook_id, notice, now)


_SIEM_CLAIM_SQL = (
    "SELECT seq, body, attempts, created_at FROM siem_queue WHERE kind = ? AND next_attempt_at <= ? "
    "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY seq LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class _Announce:
    """How new alerts are announced: webhook notices, routed by agent groups, and SIEM rows."""

    notices: Callable[[dict[str, Any]], list[Notice]] | None
    forward_to_siem: bool  # the stored alert as the API shows it is what the SIEM is told
    agent_groups: Mapping[str, list[str]]


def _insert_alert(
    conn: sqlite3.Connection, alert: dict[str, Any], announce: _Announce, window_s: float
) -> dict[str, Any]:
    """Store one alert, or fold it into the open one it repeats; return what is stored."""
    fingerprint = alert.get("fingerprint")
    if fingerprint is not None and window_s > 0:
        folded = _fold(conn, alert, fingerprint, window_s)
        if folded is not None:
            return folded  # announced when first raised: a repeat is no news to receivers
    cursor = conn.execute(
        "INSERT INTO alerts (agent_id, process_key, severity, rule_id, ts, status, body, fingerprint, "
        "last_seen_at) VALUES (?, ?, ?, ?, ?, ?, '{}', ?, ?)",
        (alert["agent_id"], alert["process_key"], alert["severity"], alert["rule_id"], alert["ts"],
         alert["status"], fingerprint, alert["ts"]),
    )  # fmt: skip
    full = {"fingerprint": None, "tags": [], **alert, "count": 1, "last_seen_at": alert["ts"]}
    full["id"] = str(cursor.lastrowid)
    conn.execute("UPDATE alerts SET body = ? WHERE id = ?", (orjson.dumps(full), cursor.lastrowid))
    now = time.time()
    if announce.notices is not None:
        _enqueue(conn, announce.notices(full), now, announce.agent_groups)
    if announce.forward_to_siem:
        _queue_siem(conn, "alert", [full], now)
    return full


def _fold(
    conn: sqlite3.Connection, alert: dict[str, Any], fingerprint: str, window_s: float
) -> dict[str, Any] | None:
    # Event time, as scoring keeps it: a replayed backlog folds as it would have live.
    row = conn.execute(
        "SELECT id, body FROM alerts WHERE fingerprint = ? AND last_seen_at >= ? AND status != 'resolved' "
        "ORDER BY last_seen_at DESC LIMIT 1",
        (fingerprint, alert["ts"] - window_s),
    ).fetchone()
    if row is None:
        return None
    first: dict[str, Any] = orjson.loads(row[1])
    last_seen = max(first["last_seen_at"], alert["ts"])
    first.update(count=first["count"] + 1, last_seen_at=last_seen, risk_score=alert["risk_score"])
    conn.execute(
        "UPDATE alerts SET count = ?, last_seen_at = ?, body = ? WHERE id = ?",
        (first["count"], last_seen, orjson.dumps(first), row[0]),
    )
    return first


def _queue_siem(conn: sqlite3.Connection, kind: str, bodies: list[dict[str, Any]], now: float) -> None:
    """Queue items for the SIEM; each body is fixed now, as JSON."""
    conn.executemany(
        "INSERT INTO siem_queue (kind, body, created_at, next_attempt_at) VALUES (?, ?, ?, ?)",
        [(kind, orjson.dumps(body), now, now) for body in bodies],
    )


def _severe_enough(severity: str | None, minimum: str | None) -> bool:
    # `min_severity` filters what has a severity (alerts) and nothing else.
    return severity is None or minimum is None or SEVERITY_ORDER[severity] >= SEVERITY_ORDER[minimum]


_HEARTBEAT_COLUMNS = ("cpu_percent", "mem_percent", "disk_percent", "spool_depth", "dropped", "uptime_s")
_INSERT_HEARTBEAT_SQL = (
    f"INSERT OR REPLACE INTO heartbeats (agent_id, ts, {', '.join(_HEARTBEAT_COLUMNS)}) "  # noqa: S608 - column names come from code
    f"VALUES (?, ?{', ?' * len(_HEARTBEAT_COLUMNS)})"
)

_USER_COLUMNS = ("name", "role", "password_hash", "created_at", "password_changed_at", "failed_signins",
                 "locked_until", "last_signin_at")  # fmt: skip
_USER_CHANGEABLE = frozenset(_USER_COLUMNS) - {"name", "created_at"}
_SESSION_COLUMNS = ("id_hash", "user_name", "csrf_token", "created_at", "last_seen_at", "expires_at",
                    "address")  # fmt: skip


def _page(items: list[dict[str, Any]], limit: int, key: Callable[[dict[str, Any]], list[Any]]) -> Page:
    if len(items) > limit:
        items = items[:limit]
        return Page(items, key(items[-1]))
    return Page(items, None)
