"""The store's SQL, written once for both backends: SQLite (embedded) and PostgreSQL (several nodes).

Every statement goes through one of two doors. A read runs a job on a read connection. A write
is a job queued to the node's one writer, which takes all jobs waiting when it is free and runs
them in one transaction (one durable commit), each job in its own savepoint so a failing job
cannot take the others down. Callers await their job's future, which resolves only after COMMIT
returned: that is what makes an ack durable.

Statements use `?` placeholders and SQL both databases accept. A backend brings the rest: its
connections (`Conn`), where a group commit runs, and its migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypedDict, TypeVar, Unpack

import msgpack
import orjson

from hub.models import SEVERITY_ORDER, Event, score_view
from hub.problems import Unavailable
from hub.store import EventBatch, EventFilter, Notice, Page, PendingBatch, ScoringState

log = logging.getLogger(__name__)
T = TypeVar("T")
_FAILURE_LOG_EVERY_S = 10.0


class Conn(Protocol):
    """One database connection as the store's SQL sees it; rows answer by index and by name."""

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return how many rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def begin(self, *, exclusive: bool) -> None:
        """Open a write transaction; `exclusive` ones run one at a time across every node."""

    async def rollback(self) -> None:
        """End the open transaction, if any, undoing it."""


Job = Callable[[Conn], Coroutine[Any, Any, Any]]


class StoreOptions(TypedDict, total=False):
    """What every backend takes besides where its database is."""

    commit_max_events: int  # most writes in one group commit
    deferred_write_delay_s: float  # longest a group of deferrable writes waits for company
    node_id: str  # this hub node's name: the batches it stores are its to score
    retry_after_ms: int  # what an `unavailable` answer tells the caller to wait
    on_commit: Callable[[int, float], None] | None  # told each group commit's size and seconds
    agent_groups: Mapping[str, list[str]] | None  # group -> agent id globs, for webhook routing


@dataclass(slots=True)
class WriteJob:
    run: Job
    size: int
    exclusive: bool
    future: asyncio.Future[Any] = field(repr=False)
    deferrable: bool = False


def migrations(dialect: str) -> list[tuple[int, str]]:
    """The numbered migration scripts of a backend, in order."""
    folder = resources.files("hub.store") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def _marks(values: Sized) -> str:
    """One placeholder per value, comma-separated."""
    return ", ".join("?" * len(values))


class SqlStore:
    """Every store operation; a backend subclass supplies connections and where commits run."""

    # What a backend's driver raises when the database itself fails (down, locked, disk full):
    # such a write is answered `unavailable`, and an agent keeps its batch and retries.
    storage_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, **options: Unpack[StoreOptions]):
        self._on_commit = options.get("on_commit")
        self._commit_max = options.get("commit_max_events", 5_000)
        self._retry_after_ms = options.get("retry_after_ms", 1000)
        self._jobs: asyncio.Queue[WriteJob] = asyncio.Queue()
        self._deferred_delay_s = options.get("deferred_write_delay_s", 0.0)
        self._node_id = options.get("node_id", "")
        self._urgent = asyncio.Event()  # set when a write that may not wait is queued
        self._urgent_queued = 0  # such writes in the queue
        self._writer_task: asyncio.Task[None] | None = None
        self._failures = 0  # group commits failed since the last report
        self._failure_logged_at = 0.0
        # Group -> agent id globs: webhook subscriptions filtered by group receive their agents' notices.
        self._agent_groups: Mapping[str, list[str]] = dict(options.get("agent_groups") or {})

    # what a backend provides -------------------------------------------------------------

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _read(self, run: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        raise NotImplementedError

    async def _commit(self, group: list[WriteJob]) -> list[tuple[bool, Any]]:
        """Run `group` through `run_group` on a write connection."""
        raise NotImplementedError

    # the writer ----------------------------------------------------------------------------

    def _start_writer(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def _stop_writer(self) -> None:
        if self._writer_task is None:
            return
        await self._jobs.join()  # drain: every queued job is committed before connections close
        self._writer_task.cancel()
        await asyncio.gather(self._writer_task, return_exceptions=True)
        self._writer_task = None

    async def ping(self) -> None:
        await self._read(lambda c: c.fetchrow("SELECT 1"))

    async def _write(
        self, run: Job, size: int = 1, *, exclusive: bool = False, deferrable: bool = False
    ) -> Any:
        """Queue a write job and return its result once committed.

        `exclusive`: the job reads what it then changes (a count, a chain, a lease), so nodes
        sharing the database must not run it beside each other's (SQLite's writer lock already
        serializes every write; PostgreSQL takes a lock for it).
        `deferrable`: its commit may wait up to `deferred_write_delay_s` for other writes to share
        it, unless one that may not wait comes first.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(WriteJob(run, size, exclusive, future, deferrable))
        if not deferrable:
            self._urgent_queued += 1
            self._urgent.set()
        return await future

    async def _wait_for_company(self) -> None:
        # Thousands of agents heartbeating would otherwise cost a commit (and an fsync) each.
        self._urgent.clear()
        if self._urgent_queued:  # one that may not wait is queued already
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._deferred_delay_s):
                await self._urgent.wait()

    async def _write_loop(self) -> None:
        while True:
            group = [await self._jobs.get()]
            if group[0].deferrable and self._deferred_delay_s:
                await self._wait_for_company()
            size = group[0].size
            while size < self._commit_max and not self._jobs.empty():
                job = self._jobs.get_nowait()
                group.append(job)
                size += job.size
            self._urgent_queued -= sum(not job.deferrable for job in group)
            try:
                started = time.perf_counter()
                outcomes = await self._commit(group)
                if self._on_commit is not None:
                    self._on_commit(size, time.perf_counter() - started)
            except Exception as exc:  # the commit itself failed: so did every job in it
                outcomes = [(False, exc)] * len(group)
            failed = next(
                (value for ok, value in outcomes if not ok and isinstance(value, self.storage_errors)), None
            )
            if failed is None:
                self._recovered()
            else:
                self._log_failure(failed)
            for job, (ok, value) in zip(group, outcomes, strict=True):
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    elif isinstance(value, self.storage_errors):  # disk full, I/O error: retryable
                        # The cause stays in the logs: agents and API callers are told no more.
                        error = Unavailable("storage unavailable", retry_after_ms=self._retry_after_ms)
                        error.__cause__ = value
                        job.future.set_exception(error)
                    else:
                        job.future.set_exception(value)
                self._jobs.task_done()

    def _log_failure(self, exc: BaseException) -> None:
        # An outage fails a commit every second or faster: say so once, then every 10 s.
        self._failures += 1
        now = time.monotonic()
        if now - self._failure_logged_at >= _FAILURE_LOG_EVERY_S:
            log.error("writes failing (%d groups since the last report): %s", self._failures, exc)
            self._failure_logged_at, self._failures = now, 0

    def _recovered(self) -> None:
        if self._failure_logged_at:
            log.warning("writes succeed again (%d more groups failed before)", self._failures)
            self._failure_logged_at, self._failures = 0.0, 0

    @staticmethod
    async def run_group(conn: Conn, group: list[WriteJob]) -> list[tuple[bool, Any]]:
        """Run every job of `group` in one transaction, each in its own savepoint."""
        outcomes: list[tuple[bool, Any]] = []
        await conn.begin(exclusive=any(job.exclusive for job in group))
        try:
            for job in group:
                await conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, await job.run(conn)))
                    await conn.execute("RELEASE job")
                except Exception as exc:  # one bad job must not fail the others in its group
                    await conn.execute("ROLLBACK TO job")
                    await conn.execute("RELEASE job")
                    outcomes.append((False, exc))
            await conn.execute("COMMIT")
        except BaseException:
            await conn.rollback()
            raise
        return outcomes

    # events ------------------------------------------------------------------------------

    async def commit_events(self, batch: EventBatch) -> set[int]:
        async def insert(conn: Conn) -> set[int]:
            seqs = [event["seq"] for event in batch.events]
            new = list(zip(batch.events, batch.bodies, strict=True))
            if stored := await _stored_seqs(conn, batch.agent_id, seqs):  # a resend: only what is new
                new = [(event, body) for event, body in new if event["seq"] not in stored]
                seqs = [event["seq"] for event, _ in new]
            inserted = 0
            # One multi-row INSERT per chunk, within SQLite's limit on bound parameters.
            for start in range(0, len(new), _ROWS_PER_INSERT):
                rows: list[Any] = [batch.agent_id, batch.received_at]  # bound once, used by every row
                chunk = new[start : start + _ROWS_PER_INSERT]
                for event, body in chunk:
                    rows += (event["seq"], event["ts"], event["kind"], event["pid"], body)
                inserted += await conn.execute(_insert_events_sql(len(chunk)), rows)
            if inserted != len(new):  # another node stored some of them since the read (PostgreSQL)
                raise Unavailable(
                    "another node stored part of this batch at the same moment",
                    retry_after_ms=self._retry_after_ms,
                )
            if seqs:  # scoring deletes it with the scores these events produce
                first, last = min(seqs), max(seqs)
                listed = None if last - first + 1 == len(seqs) else msgpack.packb(sorted(seqs))
                pending = (batch.agent_id, first, last, listed, self._node_id, batch.received_at)
                await conn.execute(_ADD_PENDING_SQL, pending)
            return set(seqs)

        if not batch.events:
            return set()
        result: set[int] = await self._write(insert, len(batch.events))
        return result

    async def last_seq(self, agent_id: str) -> int:
        row = await self._read(
            lambda c: c.fetchrow("SELECT max(seq) FROM events WHERE agent_id = ?", (agent_id,))
        )
        return int(row[0] or 0)

    async def count_events(self, agent_id: str | None = None) -> int:
        if agent_id is None:
            row = await self._read(lambda c: c.fetchrow("SELECT count(*) FROM events"))
        else:
            row = await self._read(
                lambda c: c.fetchrow("SELECT count(*) FROM events WHERE agent_id = ?", (agent_id,))
            )
        return int(row[0])

    async def list_events(self, filters: EventFilter, *, after: list[Any] | None, limit: int) -> Page:
        sql = "SELECT agent_id, seq, received_at, body FROM events WHERE (agent_id, seq) > (?, ?)"
        params: list[Any] = list(after) if after else ["", 0]
        for column, operator, value in filters.conditions():
            sql += f" AND {column} {operator} ?"
            params.append(value)
        sql += " ORDER BY agent_id, seq LIMIT ?"
        rows = await self._read(lambda c: c.fetch(sql, [*params, limit + 1]))
        items = [{"agent_id": agent_id, **msgpack.unpackb(body), "received_at": received_at}
                 for agent_id, _, received_at, body in rows]  # fmt: skip
        return _page(items, limit, lambda item: [item["agent_id"], item["seq"]])

    async def replay_events(self, after: tuple[str, int] | None, limit: int) -> list[tuple[str, Event]]:
        agent_id, seq = after or ("", 0)
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT agent_id, body FROM events WHERE (agent_id, seq) > (?, ?) "
                "ORDER BY agent_id, seq LIMIT ?",
                (agent_id, seq, limit),
            )
        )
        return [(row[0], msgpack.unpackb(row[1])) for row in rows]

    # agents ------------------------------------------------------------------------------

    async def save_agent(
        self,
        agent_id: str,
        fields: dict[str, Any],
        notices: list[Notice] | None = None,
        *,
        connection: tuple[str, float] | None = None,
        returning_within_s: float | None = None,
    ) -> bool:
        names = list(fields)
        values = [orjson.dumps(v).decode() if isinstance(v, dict) else v for v in fields.values()]
        sql = (
            f"INSERT INTO agents (agent_id, {', '.join(names)}) VALUES (?{', ?' * len(names)}) "  # noqa: S608 - column names come from code, never from input
            f"ON CONFLICT (agent_id) DO UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in names)}"
        )
        if connection is not None:
            sql += " WHERE agents.node = ? AND agents.connected_at = ?"
            values += connection
        beat = fields.get("heartbeat")

        async def save(conn: Conn) -> bool:
            now = time.time()
            # Read before the write below replaces the status it looks at.
            returning = returning_within_s is not None and await _sent_away_since(
                conn, agent_id, now - returning_within_s
            )
            if await conn.execute(sql, [agent_id, *values]) == 0:
                return False  # the agent has connected since, here or on another node
            if beat is not None:
                await conn.execute(
                    _INSERT_HEARTBEAT_SQL,
                    [agent_id, fields["last_seen"], *(beat.get(name) for name in _HEARTBEAT_COLUMNS)],
                )
            announced = returning_within_s is None or await _end_handover(conn, agent_id, returning, now)
            if announced:
                await _enqueue(conn, notices or [], now, self._agent_groups)
            return True

        saved: bool = await self._write(save)
        return saved

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
        rows = await self._read(lambda c: c.fetch(sql))
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
            lambda c: c.execute("DELETE FROM heartbeats WHERE ts < ?", (before,))
        )
        return deleted

    async def mark_node_offline(self, node: str, reason: str, now: float) -> None:
        # Only this node's agents: the others' sockets live on in nodes sharing the database.
        await self._write(
            lambda c: c.execute(
                "UPDATE agents SET status = 'offline', status_reason = ?, status_changed_at = ? "
                "WHERE status != 'offline' AND (node = ? OR node IS NULL)",
                (reason, now, node),
            )
        )

    async def clock(self) -> float | None:
        return None  # an embedded store has no clock but this machine's

    async def claim_node(
        self, lease: dict[str, Any], *, replacing: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        async def claim(conn: Conn) -> dict[str, Any] | None:
            held = await _rows(
                conn,
                "SELECT node_id, instance, host, pid, renewed_at, lease_s FROM node_leases WHERE node_id = ?",
                [lease["node_id"]],
            )
            if held and held[0]["instance"] != lease["instance"] and held[0] != replacing:
                return held[0]
            await conn.execute(
                "INSERT INTO node_leases (node_id, instance, host, pid, renewed_at, lease_s) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET instance = excluded.instance, "
                "host = excluded.host, pid = excluded.pid, renewed_at = excluded.renewed_at, "
                "lease_s = excluded.lease_s",
                [lease[column] for column in ("node_id", "instance", "host", "pid", "renewed_at", "lease_s")],
            )
            return None

        holder: dict[str, Any] | None = await self._write(claim, exclusive=True)
        return holder

    async def release_node(self, node_id: str, instance: str) -> None:
        await self._write(
            lambda c: c.execute(
                "DELETE FROM node_leases WHERE node_id = ? AND instance = ?", (node_id, instance)
            )
        )

    async def save_heartbeat(
        self,
        agent_id: str,
        beat: dict[str, Any],
        *,
        now: float,
        connection: tuple[str, float],
        notices: list[Notice],
    ) -> bool:
        # SET reads the row as it was: only a status that was not online changes, and then
        # status_changed_at becomes `now`, which is how the caller learns it came back.
        sql = (
            "UPDATE agents SET last_seen = ?, heartbeat = ?, status = 'online', "
            "status_reason = CASE WHEN status = 'online' THEN status_reason ELSE 'restored' END, "
            "status_changed_at = CASE WHEN status = 'online' THEN status_changed_at ELSE ? END "
            "WHERE agent_id = ? AND node = ? AND connected_at = ? RETURNING status_changed_at"
        )
        params = [now, orjson.dumps(beat).decode(), now, agent_id, *connection]

        async def save(conn: Conn) -> bool:
            rows = await conn.fetch(sql, params)
            if not rows:
                return False
            await conn.execute(
                _INSERT_HEARTBEAT_SQL, [agent_id, now, *(beat.get(name) for name in _HEARTBEAT_COLUMNS)]
            )
            restored: bool = rows[0][0] == now
            if restored:
                await _enqueue(conn, notices, now, self._agent_groups)
            return restored

        restored: bool = await self._write(save, deferrable=True)
        return restored

    async def mark_silent_offline(
        self, *, before: float, now: float, notices: Callable[[str], list[Notice]]
    ) -> list[str]:
        async def sweep(conn: Conn) -> list[str]:
            # One UPDATE: of nodes sweeping at once, each agent is changed, and announced, by one.
            rows = await conn.fetch(
                "UPDATE agents SET status = 'offline', status_reason = 'missed_heartbeats', "
                "status_changed_at = ? WHERE status != 'offline' AND last_seen < ? RETURNING agent_id",
                (now, before),
            )
            agent_ids = sorted(row[0] for row in rows)
            await _enqueue(
                conn, [n for agent_id in agent_ids for n in notices(agent_id)], now, self._agent_groups
            )
            return agent_ids

        swept: list[str] = await self._write(sweep)
        return swept

    # processes and scores ----------------------------------------------------------------

    async def replace_scores(self, states: list[dict[str, Any]], *, replayed_from: float) -> None:
        async def replace(conn: Conn) -> None:
            await conn.execute("DELETE FROM processes")
            await _upsert_processes(conn, states)
            # Stored before the replay began, so the replay read them: scored.
            await conn.execute("DELETE FROM scoring_pending WHERE committed_at < ?", (replayed_from,))

        await self._write(replace, len(states), exclusive=True)

    async def scoring_states(self, agent_ids: Collection[str]) -> dict[str, ScoringState]:
        async def load(conn: Conn) -> dict[str, ScoringState]:
            return {agent_id: await _scoring_state(conn, agent_id) for agent_id in agent_ids}

        # Queued behind the commits before it, not read beside them: ingest hands a batch to
        # scoring in the loop turn its commit is answered, so by the time this answer arrives
        # every batch this node committed before it is in scoring's queue.
        states: dict[str, ScoringState] = await self._write(load)
        return states

    async def pending_agents(self, *, before: float, node: str | None = None) -> list[str]:
        sql = "SELECT DISTINCT agent_id FROM scoring_pending WHERE committed_at < ?"
        params: list[Any] = [before]
        if node is not None:
            sql += " OR node = ?"
            params.append(node)
        rows = await self._read(lambda c: c.fetch(sql + " ORDER BY agent_id", params))
        return [row[0] for row in rows]

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
        rows = await self._read(lambda c: c.fetch(sql, [*params, limit + 1]))
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
        rows = await self._read(lambda c: c.fetch(sql, [*params, limit + 1]))
        return _page([orjson.loads(row[0]) for row in rows], limit, lambda item: [item["process_key"]])

    async def get_process(self, process_key: str) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.fetchrow("SELECT state FROM processes WHERE process_key = ?", (process_key,))
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
        scored: list[tuple[str, int]] | None = None,
    ) -> list[dict[str, Any]]:
        announce = _Announce(notices, forward_to_siem, self._agent_groups)
        processes, siem_events, scored = processes or [], siem_events or [], scored or []

        async def save(conn: Conn) -> list[dict[str, Any]]:
            await _upsert_processes(conn, processes)
            if scored:
                await conn.executemany(_SCORED_SQL, scored)
            await _queue_siem(conn, "event", siem_events, time.time())
            return [await _insert_alert(conn, alert, announce, suppression_window_s) for alert in alerts]

        if not processes and not alerts and not siem_events and not scored:
            return []
        # Folding an alert reads what it then changes; process states and pending batches don't.
        result: list[dict[str, Any]] = await self._write(
            save, len(processes) + len(alerts) + len(siem_events), exclusive=bool(alerts or siem_events)
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
        rows = await self._read(lambda c: c.fetch(sql + " ORDER BY id DESC LIMIT ?", [*params, limit + 1]))
        items = [orjson.loads(row[0]) for row in rows]
        return _page(items, limit, lambda item: [int(item["id"])])

    async def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        row = await self._read(lambda c: c.fetchrow("SELECT body FROM alerts WHERE id = ?", (alert_id,)))
        return orjson.loads(row[0]) if row else None

    async def set_alert_status(
        self, alert_id: int, status: str, change: dict[str, Any], *, allowed_from: tuple[str, ...]
    ) -> dict[str, Any] | None:
        async def update(conn: Conn) -> dict[str, Any] | None:
            row = await conn.fetchrow("SELECT body FROM alerts WHERE id = ?", (alert_id,))
            if row is None:
                return None
            alert: dict[str, Any] = orjson.loads(row[0])
            if alert["status"] not in allowed_from:
                return alert
            alert.update(change, status=status)
            await conn.execute(
                "UPDATE alerts SET status = ?, body = ? WHERE id = ?", (status, orjson.dumps(alert), alert_id)
            )
            return alert

        result: dict[str, Any] | None = await self._write(update, exclusive=True)
        return result

    # agent signing secrets ---------------------------------------------------------------

    async def get_agent_secret(self, agent_id: str) -> str | None:
        row = await self._read(
            lambda c: c.fetchrow("SELECT secret FROM agent_secrets WHERE agent_id = ?", (agent_id,))
        )
        return str(row[0]) if row else None

    async def set_agent_secret(self, agent_id: str, secret: str | None) -> bool:
        async def write(conn: Conn) -> bool:
            if secret is None:
                return (await conn.execute("DELETE FROM agent_secrets WHERE agent_id = ?", (agent_id,))) > 0
            await conn.execute(
                "INSERT INTO agent_secrets (agent_id, secret, created_at) VALUES (?, ?, ?) ON CONFLICT "
                "(agent_id) DO UPDATE SET secret = excluded.secret, created_at = excluded.created_at",
                (agent_id, secret, time.time()),
            )
            return True

        changed: bool = await self._write(write)
        return changed

    # idempotency -------------------------------------------------------------------------

    async def get_idempotent(self, owner: str, key: str, now: float) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.fetchrow(
                "SELECT request_hash, status, content_type, body, location FROM idempotency "
                "WHERE owner = ? AND key = ? AND expires_at > ?",
                (owner, key, now),
            )
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
        async def save(conn: Conn) -> None:
            await conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (time.time(),))
            await conn.execute(
                "INSERT INTO idempotency (owner, key, request_hash, status, content_type, body, location, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, key) DO UPDATE SET "
                "request_hash = excluded.request_hash, status = excluded.status, "
                "content_type = excluded.content_type, body = excluded.body, location = excluded.location, "
                "expires_at = excluded.expires_at",
                (owner, key, answer["request_hash"], answer["status"], answer["content_type"], answer["body"],
                 answer["location"], expires_at),
            )  # fmt: skip

        await self._write(save)

    # audit log and operator token revocation ---------------------------------------------

    async def append_audit(self, link: Callable[[int, str | None], dict[str, Any]]) -> dict[str, Any]:
        async def append(conn: Conn) -> dict[str, Any]:
            # An exclusive write: no connection, in this process or another, can append
            # between this read and the insert, so the chain cannot fork.
            last = await conn.fetchrow("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
            entry = link(last[0], last[1]) if last else link(0, None)
            await conn.execute(
                "INSERT INTO audit_log (id, ts, actor, token_id, action, method, path, target, status, "
                "correlation_id, client, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry["id"], entry["ts"], entry["actor"], entry["token_id"], entry["action"],
                 entry["method"], entry["path"], orjson.dumps(entry["target"]).decode(), entry["status"],
                 entry["correlation_id"], entry["client"], entry["prev_hash"], entry["hash"]),
            )  # fmt: skip
            return entry

        result: dict[str, Any] = await self._write(append, exclusive=True)
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
        async def revoke(conn: Conn) -> dict[str, Any]:
            await conn.execute(
                "INSERT INTO revoked_tokens (jti, revoked_at, reason) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (jti, revoked_at, reason),
            )
            return (
                await _rows(conn, "SELECT jti, revoked_at, reason FROM revoked_tokens WHERE jti = ?", [jti])
            )[0]

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
        "SELECT * FROM (SELECT certificates.*, revocations.revoked_at, revocations.reason AS "
        "revocation_reason FROM certificates LEFT JOIN revocations USING (fingerprint)) AS known"
    )

    async def save_certificate(self, record: dict[str, Any]) -> dict[str, Any]:
        names = list(record)

        async def save(conn: Conn) -> dict[str, Any]:
            await conn.execute(
                f"INSERT INTO certificates ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "  # noqa: S608 - column names come from code, never from input
                "ON CONFLICT (fingerprint) DO UPDATE SET source = 'uploaded' "
                "WHERE excluded.source = 'uploaded'",
                list(record.values()),
            )
            return (
                await _rows(conn, self._CERTIFICATES_SQL + " WHERE fingerprint = ?", [record["fingerprint"]])
            )[0]

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
        async def notify(conn: Conn) -> int:
            # Marked and queued in one transaction: several nodes checking at once announce it once.
            due = await _rows(
                conn,
                self._CERTIFICATES_SQL + " WHERE revoked_at IS NULL AND expiry_notified_at IS NULL "
                "AND not_after > ? AND not_after <= ? ORDER BY not_after",
                [now, until],
            )
            for record in due:
                await conn.execute(
                    "UPDATE certificates SET expiry_notified_at = ? WHERE fingerprint = ?",
                    (now, record["fingerprint"]),
                )
                await _enqueue(conn, [notice(record)], now, self._agent_groups)
            return len(due)

        count: int = await self._write(notify, exclusive=True)
        return count

    async def uploaded_certificates(self, now: float) -> list[str]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT pem FROM certificates WHERE source = 'uploaded' AND not_after > ?", (now,)
            )
        )
        return [row[0] for row in rows]

    # commands ----------------------------------------------------------------------------

    async def insert_command(self, command: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        async def insert(conn: Conn) -> tuple[dict[str, Any], bool]:
            inserted = await conn.execute(
                f"INSERT INTO commands ({', '.join(_COMMAND_COLUMNS)}) "  # noqa: S608 - column names come from code
                f"VALUES ({', '.join('?' * len(_COMMAND_COLUMNS))}) ON CONFLICT (id) DO NOTHING",
                [_command_value(name, command[name]) for name in _COMMAND_COLUMNS],
            )
            stored = (await _rows(conn, "SELECT * FROM commands WHERE id = ?", [command["id"]]))[0]
            return _command_view(stored), inserted == 1

        result: tuple[dict[str, Any], bool] = await self._write(insert)
        return result

    async def get_command(self, command_id: str) -> dict[str, Any] | None:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM commands WHERE id = ?", [command_id]))
        return _command_view(rows[0]) if rows else None

    async def list_commands(
        self, agent_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        return await self._newest_first(
            "SELECT * FROM commands WHERE agent_id = ?", agent_id, state, after, limit, _command_view
        )

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
        self,
        command_id: str,
        *,
        expect: tuple[str, ...],
        changes: dict[str, Any],
        via: tuple[str, float] | None = None,
    ) -> dict[str, Any] | None:
        sql = (
            f"UPDATE commands SET {', '.join(f'{name} = ?' for name in changes)} "  # noqa: S608 - names come from code
            f"WHERE id = ? AND state IN ({', '.join('?' * len(expect))})"
        )
        params = [*(_command_value(name, value) for name, value in changes.items()), command_id, *expect]
        if via is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM agents WHERE agents.agent_id = commands.agent_id"
                " AND agents.node = ? AND agents.connected_at = ?)"
            )
            params += via
        sql += " RETURNING *"
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
        async def insert(conn: Conn) -> bool:
            # Counted in the same transaction: concurrent creations cannot pass the limit together.
            if (await conn.fetchrow("SELECT count(*) FROM webhooks"))[0] >= max_count:
                return False
            await conn.execute(
                f"INSERT INTO webhooks ({', '.join(_WEBHOOK_COLUMNS)}) "  # noqa: S608 - column names come from code
                f"VALUES ({', '.join('?' * len(_WEBHOOK_COLUMNS))})",
                [_webhook_value(name, record[name]) for name in _WEBHOOK_COLUMNS],
            )
            return True

        inserted: bool = await self._write(insert, exclusive=True)
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
        async def update(conn: Conn) -> dict[str, Any] | None:
            rows = await _rows(conn, "SELECT * FROM webhooks WHERE id = ?", [webhook_id])
            if not rows:
                return None
            changes = change(_webhook_record(rows[0]))
            if not changes or not set(changes) <= set(_WEBHOOK_COLUMNS):
                raise ValueError(f"cannot change webhook columns {sorted(changes)}")
            updated = await _rows(
                conn,
                f"UPDATE webhooks SET {', '.join(f'{name} = ?' for name in changes)} "  # noqa: S608 - names checked above
                "WHERE id = ? RETURNING *",
                [*(_webhook_value(name, value) for name, value in changes.items()), webhook_id],
            )
            return _webhook_record(updated[0])

        result: dict[str, Any] | None = await self._write(update, exclusive=True)
        return result

    async def delete_webhook(self, webhook_id: str) -> bool:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
        )
        return deleted == 1

    # webhook deliveries (the outbox) -----------------------------------------------------

    async def enqueue_delivery(self, webhook_id: str, notice: Notice, now: float) -> dict[str, Any] | None:
        async def enqueue(conn: Conn) -> dict[str, Any] | None:
            if (await conn.fetchrow("SELECT 1 FROM webhooks WHERE id = ?", (webhook_id,))) is None:
                return None
            delivery_id = await _insert_delivery(conn, webhook_id, notice, now)
            return (await _rows(conn, _DELIVERIES_SQL + " WHERE id = ?", [delivery_id]))[0]

        result: dict[str, Any] | None = await self._write(enqueue)
        return result

    async def claim_deliveries(
        self, *, now: float, node: str, lease_s: float, limit: int
    ) -> list[dict[str, Any]]:
        async def claim(conn: Conn) -> list[dict[str, Any]]:
            # An exclusive write: nodes sharing the database claim one at a time.
            rows = await _rows(conn, _CLAIM_SQL, [now, now, limit])
            await conn.executemany(
                "UPDATE webhook_deliveries SET lease_until = ?, lease_node = ? WHERE id = ?",
                [(now + lease_s, node, row["id"]) for row in rows],
            )
            return rows

        claimed: list[dict[str, Any]] = await self._write(claim, exclusive=True)
        return claimed

    async def finish_delivery(self, delivery_id: str, node: str, changes: dict[str, Any]) -> bool:
        if not changes or not set(changes) <= _DELIVERY_OUTCOME:
            raise ValueError(f"cannot change delivery columns {sorted(changes)}")
        sql = (
            f"UPDATE webhook_deliveries SET {', '.join(f'{name} = ?' for name in changes)}, "  # noqa: S608 - names checked above
            "lease_until = NULL, lease_node = NULL WHERE id = ? AND lease_node = ? AND state = 'pending'"
        )
        updated: int = await self._write(lambda c: c.execute(sql, [*changes.values(), delivery_id, node]))
        return updated == 1

    async def release_leases(self, node: str) -> int:
        released: int = await self._write(
            lambda c: c.execute(
                "UPDATE webhook_deliveries SET lease_until = NULL, lease_node = NULL WHERE lease_node = ?",
                (node,),
            )
        )
        return released

    async def count_deliveries(self) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM webhook_deliveries GROUP BY state"
        rows = await self._read(lambda c: c.fetch(sql))
        return {"pending": 0, "delivered": 0, "dead": 0} | dict(rows)

    async def prune_deliveries(self, before: float) -> int:
        sql = "DELETE FROM webhook_deliveries WHERE created_at < ? AND state != 'pending'"
        deleted: int = await self._write(lambda c: c.execute(sql, (before,)))
        return deleted

    async def next_delivery_at(self, *, now: float) -> float | None:
        sql = (
            "SELECT min(next_attempt_at) FROM webhook_deliveries AS d WHERE state = 'pending' "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS f WHERE f.webhook_id = d.webhook_id "
            "AND f.state = 'pending' AND f.lease_until > ?)"
        )
        row = await self._read(lambda c: c.fetchrow(sql, (now,)))
        return None if row[0] is None else float(row[0])

    async def list_deliveries(
        self, webhook_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        return await self._newest_first(
            _DELIVERIES_SQL + " WHERE webhook_id = ?", webhook_id, state, after, limit, _delivery_view
        )

    async def _newest_first(
        self,
        select: str,
        owner: str,
        state: str | None,
        after: list[Any] | None,
        limit: int,
        view: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Page:
        """A page of `select`'s rows (its one `?` is `owner`), newest `seq` first, in `state` if given."""
        sql = select + " AND seq < ?"
        params: list[Any] = [owner, int(after[0]) if after else 2**62]
        if state:
            sql += " AND state = ?"
            params.append(state)
        rows = await self._read(lambda c: _rows(c, sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1]))
        page = _page(rows, limit, lambda row: [row["seq"]])
        return Page([view(row) for row in page.items], page.next_key)

    async def redeliver(
        self, webhook_id: str, delivery_id: str, now: float
    ) -> tuple[dict[str, Any], bool] | None:
        async def redeliver(conn: Conn) -> tuple[dict[str, Any], bool] | None:
            changed = await conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "delivered_at = NULL, lease_until = NULL, lease_node = NULL "
                "WHERE id = ? AND webhook_id = ? AND state != 'pending'",
                (now, delivery_id, webhook_id),
            )
            rows = await _rows(
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
            "SELECT webhook_id, count(*) FILTER (WHERE state = 'pending') AS pending, "  # noqa: S608 - only placeholders are interpolated
            "count(*) FILTER (WHERE state = 'dead') AS dead, "
            "max(last_attempt_at) AS last_delivery_at, "
            "(SELECT last_status FROM webhook_deliveries AS latest WHERE latest.webhook_id = d.webhook_id "
            "AND latest.last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1) AS last_status "
            f"FROM webhook_deliveries AS d WHERE webhook_id IN ({_marks(webhook_ids)}) "
            "GROUP BY webhook_id"
        )
        rows = await self._read(lambda c: _rows(c, sql, webhook_ids))
        found = {row.pop("webhook_id"): row for row in rows}
        return {webhook_id: found.get(webhook_id, dict(_NO_DELIVERIES)) for webhook_id in webhook_ids}

    # operator accounts and web sessions --------------------------------------------------

    async def insert_user(self, record: dict[str, Any]) -> bool:
        if not set(record) <= set(_USER_COLUMNS):
            raise ValueError(f"unknown user columns {sorted(set(record) - set(_USER_COLUMNS))}")
        names = list(record)

        async def insert(conn: Conn) -> bool:
            inserted = await conn.execute(
                f"INSERT INTO users ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "  # noqa: S608 - column names come from code
                "ON CONFLICT (name) DO NOTHING",
                [record[name] for name in names],
            )
            return inserted == 1

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
        updated: int = await self._write(lambda c: c.execute(sql, [*fields.values(), name]))
        return updated == 1

    async def add_signin_failure(self, name: str) -> int | None:
        rows = await self._write(
            lambda c: c.fetch(
                "UPDATE users SET failed_signins = failed_signins + 1 WHERE name = ? "
                "RETURNING failed_signins",
                (name,),
            )
        )
        return int(rows[0][0]) if rows else None

    async def delete_user(self, name: str) -> bool:
        async def delete(conn: Conn) -> bool:
            await conn.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            return (await conn.execute("DELETE FROM users WHERE name = ?", (name,))) == 1

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
            lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))
        )
        return deleted == 1

    async def delete_sessions(self, user_name: str) -> int:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM sessions WHERE user_name = ?", (user_name,))
        )
        return deleted

    async def prune_sessions(self, now: float) -> int:
        deleted: int = await self._write(
            lambda c: c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
        )
        return deleted

    # revocation --------------------------------------------------------------------------

    async def revocations_since(self, after: float) -> list[dict[str, Any]]:
        sql = (
            "SELECT fingerprint, reason, revoked_at FROM revocations WHERE revoked_at > ? ORDER BY revoked_at"
        )
        return await self._read(lambda c: _rows(c, sql, [after]))

    async def is_revoked(self, fingerprint: str) -> bool:
        row = await self._read(
            lambda c: c.fetchrow("SELECT 1 FROM revocations WHERE fingerprint = ?", (fingerprint,))
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
        async def revoke(conn: Conn) -> bool:
            now = time.time()
            inserted = await conn.execute(
                "INSERT INTO revocations (fingerprint, serial, agent_id, reason, revoked_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (fingerprint, serial, agent_id, reason, now),
            )
            if inserted != 1:
                return False
            await _enqueue(conn, notices or [], now, self._agent_groups)
            return True

        new: bool = await self._write(revoke)
        return new

    # SIEM forwarding (its own queue) ---------------------------------------------------------

    async def claim_siem(
        self, *, now: float, node: str, lease_s: float, limit: int, filled_before: float
    ) -> tuple[str, list[dict[str, Any]]] | None:
        async def claim(conn: Conn) -> tuple[str, list[dict[str, Any]]] | None:
            # An exclusive write: nodes sharing the database claim one at a time.
            for kind in ("alert", "event"):  # alerts first: an event backlog never holds them up
                rows = await _rows(conn, _SIEM_CLAIM_SQL, [kind, now, now, limit])
                if rows and (len(rows) == limit or rows[0]["created_at"] < filled_before):
                    await conn.executemany(
                        "UPDATE siem_queue SET lease_until = ?, lease_node = ? WHERE seq = ?",
                        [(now + lease_s, node, row["seq"]) for row in rows],
                    )
                    return kind, rows
            return None

        claimed: tuple[str, list[dict[str, Any]]] | None = await self._write(claim, exclusive=True)
        return claimed

    async def finish_siem(self, seqs: list[int]) -> int:
        sql = f"DELETE FROM siem_queue WHERE seq IN ({_marks(seqs)})"  # noqa: S608 - only placeholders
        deleted: int = await self._write(lambda c: c.execute(sql, seqs))
        return deleted

    async def retry_siem(self, seqs: list[int], node: str, next_attempt_at: float) -> int:
        sql = (
            "UPDATE siem_queue SET attempts = attempts + 1, next_attempt_at = ?, lease_until = NULL, "  # noqa: S608 - only placeholders are interpolated
            f"lease_node = NULL WHERE seq IN ({_marks(seqs)}) AND lease_node = ?"
        )
        params = (next_attempt_at, *seqs, node)
        updated: int = await self._write(lambda c: c.execute(sql, params))
        return updated

    async def release_siem_leases(self, node: str) -> int:
        sql = "UPDATE siem_queue SET lease_until = NULL, lease_node = NULL WHERE lease_node = ?"
        released: int = await self._write(lambda c: c.execute(sql, (node,)))
        return released

    async def next_siem_at(self, *, now: float, fill_s: float) -> float | None:
        # The oldest unleased row of each kind says when its batch is due: once it waited
        # `fill_s` for company, and not before its next attempt.
        sql = (
            "SELECT min(CASE WHEN next_attempt_at > created_at + ? THEN next_attempt_at "
            "ELSE created_at + ? END) FROM (SELECT kind, min(seq) AS seq FROM siem_queue "
            "WHERE lease_until IS NULL OR lease_until <= ? GROUP BY kind) AS oldest "
            "JOIN siem_queue USING (seq)"
        )
        row = await self._read(lambda c: c.fetchrow(sql, (fill_s, fill_s, now)))
        return None if row[0] is None else float(row[0])

    async def siem_queue_depth(self) -> int:
        row = await self._read(lambda c: c.fetchrow("SELECT count(*) FROM siem_queue"))
        return int(row[0])

    async def trim_siem_queue(self, max_rows: int) -> int:
        async def trim(conn: Conn) -> int:
            over = (await conn.fetchrow("SELECT count(*) FROM siem_queue"))[0] - max_rows
            if over <= 0:
                return 0
            return await conn.execute(
                "DELETE FROM siem_queue WHERE seq IN "
                "(SELECT seq FROM siem_queue WHERE kind = 'event' ORDER BY seq LIMIT ?)",
                (over,),
            )

        dropped: int = await self._write(trim)
        return dropped

    # agent throttles ---------------------------------------------------------------------

    async def set_throttle(self, record: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        async def save(conn: Conn) -> dict[str, Any]:
            values = [record[name] for name in _THROTTLE_COLUMNS]
            await conn.execute(_REPLACE_THROTTLE_SQL if replace else _KEEP_THROTTLE_SQL, values)
            return (
                await _rows(conn, "SELECT * FROM agent_throttles WHERE agent_id = ?", [record["agent_id"]])
            )[0]

        stored: dict[str, Any] = await self._write(save)
        return stored

    async def get_throttle(self, agent_id: str) -> dict[str, Any] | None:
        sql = "SELECT * FROM agent_throttles WHERE agent_id = ?"
        rows = await self._read(lambda c: _rows(c, sql, [agent_id]))
        return rows[0] if rows else None

    async def list_throttles(self) -> list[dict[str, Any]]:
        return await self._read(lambda c: _rows(c, "SELECT * FROM agent_throttles ORDER BY agent_id", []))

    async def delete_throttle(self, agent_id: str) -> bool:
        async def delete(conn: Conn) -> bool:
            return (await conn.execute("DELETE FROM agent_throttles WHERE agent_id = ?", (agent_id,))) > 0

        deleted: bool = await self._write(delete)
        return deleted


_THROTTLE_COLUMNS = ("agent_id", "events_per_s", "reason", "throttled_at", "throttled_by")
_KEEP_THROTTLE_SQL = (
    f"INSERT INTO agent_throttles ({', '.join(_THROTTLE_COLUMNS)}) VALUES ({_marks(_THROTTLE_COLUMNS)}) "  # noqa: S608 - column names come from code
    "ON CONFLICT (agent_id) DO NOTHING"
)
_REPLACE_THROTTLE_SQL = _KEEP_THROTTLE_SQL.removesuffix("NOTHING") + (
    "UPDATE SET events_per_s = excluded.events_per_s, reason = excluded.reason, "
    "throttled_at = excluded.throttled_at, throttled_by = excluded.throttled_by"
)
_ROWS_PER_INSERT = 4000  # 5 parameters a row; SQLite allows 32,766 per statement, PostgreSQL 32,767
_SEQS_PER_LOOKUP = 1000  # seqs looked up by one statement


async def _stored_seqs(conn: Conn, agent_id: str, seqs: list[int]) -> set[int]:
    """Which of `seqs` are stored already: usually none. Cheaper than INSERT ... RETURNING,
    which costs SQLite a microsecond a row."""
    low, high = min(seqs), max(seqs)
    if high - low < 2 * len(seqs):  # a batch's seqs are nearly always a run: one range read
        return {row[0] for row in await _in_span(conn, "seq", agent_id, low, high)}
    # Scattered seqs: look each up, or a batch such as [1, 10**12] would read the agent's history.
    return {row[0] for row in await _by_seq(conn, "seq", agent_id, seqs)}


async def _in_span(conn: Conn, column: str, agent_id: str, low: int, high: int) -> list[Any]:
    """`column` of the agent's stored events from seq `low` to `high`, in seq order."""
    return await conn.fetch(
        f"SELECT {column} FROM events WHERE agent_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",  # noqa: S608 - a column name from code
        (agent_id, low, high),
    )


async def _by_seq(conn: Conn, column: str, agent_id: str, seqs: list[int]) -> list[Any]:
    """`column` of the agent's stored events with these seqs, in seq order within each lookup."""
    rows: list[Any] = []
    for start in range(0, len(seqs), _SEQS_PER_LOOKUP):
        chunk = seqs[start : start + _SEQS_PER_LOOKUP]
        rows += await conn.fetch(_by_seq_sql(column, len(chunk)), [agent_id, *chunk])
    return rows


@functools.lru_cache(maxsize=64)
def _by_seq_sql(column: str, count: int) -> str:
    return f"SELECT {column} FROM events WHERE agent_id = ? AND seq IN ({_marks(range(count))}) ORDER BY seq"  # noqa: S608 - a column name from code, placeholders


@functools.lru_cache(maxsize=64)
def _insert_events_sql(rows: int) -> str:
    # ?1 (agent_id) and ?2 (received_at) are the batch's, bound once: 5 values a row, not 7.
    values = ",".join(f"(?1,?{n},?{n + 1},?{n + 2},?{n + 3},?2,?{n + 4})" for n in range(3, 3 + 5 * rows, 5))
    return (
        f"INSERT INTO events (agent_id, seq, ts, kind, pid, received_at, body) VALUES {values} "  # noqa: S608
        "ON CONFLICT (agent_id, seq) DO NOTHING"
    )


async def _upsert_processes(conn: Conn, states: list[dict[str, Any]]) -> None:
    await conn.executemany(
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


_ADD_PENDING_SQL = (
    "INSERT INTO scoring_pending (agent_id, first_seq, last_seq, seqs, node, committed_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_SCORED_SQL = "DELETE FROM scoring_pending WHERE agent_id = ? AND first_seq = ?"


async def _scoring_state(conn: Conn, agent_id: str) -> ScoringState:
    processes = await conn.fetch("SELECT state FROM processes WHERE agent_id = ? AND exited = 0", (agent_id,))
    rows = await conn.fetch(
        "SELECT first_seq, last_seq, seqs, node, committed_at FROM scoring_pending WHERE agent_id = ? "
        "ORDER BY first_seq",
        (agent_id,),
    )
    pending = []
    for first, last, seqs, node, at in rows:
        bodies = (  # a run: every seq in it is this batch's
            await _in_span(conn, "body", agent_id, first, last)
            if seqs is None
            else await _by_seq(conn, "body", agent_id, msgpack.unpackb(seqs))
        )
        pending.append(PendingBatch(first, node, at, [msgpack.unpackb(row[0]) for row in bodies]))
    return ScoringState([orjson.loads(row[0]) for row in processes], pending)


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


async def _process_tree(
    conn: Conn, process_key: str, ancestors: int, descendants: int, limit: int
) -> list[dict[str, Any]] | None:
    row = await conn.fetchrow("SELECT state FROM processes WHERE process_key = ?", (process_key,))
    if row is None:
        return None
    process = {**orjson.loads(row[0]), "parent_key": None}
    seen = {process_key}  # bad data could make a cycle: no process is taken twice
    chain = await _ancestors(conn, process, ancestors, seen)
    return chain + await _descendants(conn, process, descendants, limit - len(chain), seen)


async def _ancestors(
    conn: Conn, process: dict[str, Any], levels: int, seen: set[str]
) -> list[dict[str, Any]]:
    """`process` and up to `levels` of its ancestors, the topmost first."""
    chain = [process]
    while len(chain) <= levels and (child := chain[-1])["ppid"] is not None:
        params = (child["agent_id"], child["ppid"], child["start_ts"], child["process_key"])
        row = await conn.fetchrow(_PARENT_SQL, params)
        parent = orjson.loads(row[0]) if row else None
        if parent is None or parent["process_key"] in seen:
            break
        child["parent_key"] = parent["process_key"]
        seen.add(parent["process_key"])
        chain.append({**parent, "parent_key": None})
    return chain[::-1]


async def _descendants(
    conn: Conn, process: dict[str, Any], levels: int, room: int, seen: set[str]
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
            for (state,) in await conn.fetch(_CHILDREN_SQL, params):
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
    "USING (agent_id)) AS agents_with_risk"
)
_AGENTS_BY_ATTENTION_SQL = (
    _AGENTS_SQL
    + " ORDER BY CASE status WHEN 'offline' THEN 0 WHEN 'late' THEN 1 ELSE 2 END, risk DESC, agent_id LIMIT ?"
)


async def _rows(conn: Conn, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(row) for row in await conn.fetch(sql, params)]


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
    "SELECT d.id, d.webhook_id, d.event_type, d.body, d.attempts, d.next_attempt_at, "
    "w.url, w.secret, w.previous_secret, w.previous_secret_expires_at "
    "FROM webhook_deliveries AS d JOIN webhooks AS w ON w.id = d.webhook_id "
    "WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS f WHERE f.webhook_id = d.webhook_id "
    "AND f.state = 'pending' AND f.lease_until > ?) "
    "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS e WHERE e.webhook_id = d.webhook_id "
    "AND e.state = 'pending' AND (e.next_attempt_at, e.seq) < (d.next_attempt_at, d.seq)) "
    "ORDER BY d.next_attempt_at, d.seq LIMIT ?"
)


def _delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in _DELIVERY_COLUMNS}  # `seq` is the store's own sort key


async def _insert_delivery(conn: Conn, webhook_id: str, notice: Notice, now: float) -> str:
    delivery_id = "whd_" + secrets.token_hex(16)
    # The body is fixed now: every attempt, and every duplicate, sends these bytes.
    body = orjson.dumps({"delivery_id": delivery_id, **notice.body})
    await conn.execute(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_type, body, state, next_attempt_at, "
        "created_at, handover_of) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
        (
            delivery_id,
            webhook_id,
            notice.event_type,
            body,
            notice.first_attempt_at or now,
            now,
            notice.handover_of,
        ),
    )
    return delivery_id


async def _sent_away_since(conn: Conn, agent_id: str, since: float) -> bool:
    """Whether the agent's stored status is that a stopping node sent it away after `since`."""
    row = await conn.fetchrow(
        "SELECT 1 FROM agents WHERE agent_id = ? AND status = 'offline' "
        "AND status_reason = 'server_shutdown' AND status_changed_at >= ?",
        [agent_id, since],
    )
    return row is not None


async def _end_handover(conn: Conn, agent_id: str, returning: bool, now: float) -> bool:
    """Whether webhooks were, or are being, told that the agent went: False when it is `returning`
    from a handover and nothing of that has been sent (that notice is withdrawn)."""
    announced = True
    if returning:
        await conn.execute(
            "DELETE FROM webhook_deliveries WHERE handover_of = ? AND state = 'pending' AND attempts = 0 "
            "AND (lease_until IS NULL OR lease_until <= ?)",
            [agent_id, now],
        )
        sent = await conn.fetchrow(
            "SELECT 1 FROM webhook_deliveries WHERE handover_of = ? LIMIT 1", [agent_id]
        )
        announced = sent is not None
    # Each handover is judged on its own: the next one starts with no marks.
    await conn.execute("UPDATE webhook_deliveries SET handover_of = NULL WHERE handover_of = ?", [agent_id])
    return announced


async def _enqueue(
    conn: Conn, notices: list[Notice], now: float, agent_groups: Mapping[str, list[str]]
) -> None:
    """Queue a delivery of each notice to every enabled subscription that wants it."""
    if not notices:
        return
    sql = "SELECT id, event_types, min_severity, routes FROM webhooks WHERE enabled = 1"
    for webhook_id, event_types, min_severity, routes in await conn.fetch(sql):
        wanted, routing = orjson.loads(event_types), orjson.loads(routes)
        for notice in notices:
            if (
                notice.event_type in wanted
                and _severe_enough(notice.severity, min_severity)
                and notice.routed(routing, agent_groups)
            ):
                await _insert_delivery(conn, webhook_id, notice, now)


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


async def _insert_alert(
    conn: Conn, alert: dict[str, Any], announce: _Announce, window_s: float
) -> dict[str, Any]:
    """Store one alert, or fold it into the open one it repeats; return what is stored."""
    fingerprint = alert.get("fingerprint")
    if fingerprint is not None and window_s > 0:
        folded = await _fold(conn, alert, fingerprint, window_s)
        if folded is not None:
            return folded  # announced when first raised: a repeat is no news to receivers
    row = await conn.fetchrow(
        "INSERT INTO alerts (agent_id, process_key, severity, rule_id, ts, status, body, fingerprint, "
        "last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (alert["agent_id"], alert["process_key"], alert["severity"], alert["rule_id"], alert["ts"],
         alert["status"], b"{}", fingerprint, alert["ts"]),
    )  # fmt: skip
    full = {"fingerprint": None, "tags": [], **alert, "count": 1, "last_seen_at": alert["ts"]}
    full["id"] = str(row[0])
    await conn.execute("UPDATE alerts SET body = ? WHERE id = ?", (orjson.dumps(full), row[0]))
    now = time.time()
    if announce.notices is not None:
        await _enqueue(conn, announce.notices(full), now, announce.agent_groups)
    if announce.forward_to_siem:
        await _queue_siem(conn, "alert", [full], now)
    return full


async def _fold(
    conn: Conn, alert: dict[str, Any], fingerprint: str, window_s: float
) -> dict[str, Any] | None:
    # Event time, as scoring keeps it: a replayed backlog folds as it would have live.
    row = await conn.fetchrow(
        "SELECT id, body FROM alerts WHERE fingerprint = ? AND last_seen_at >= ? AND status != 'resolved' "
        "ORDER BY last_seen_at DESC LIMIT 1",
        (fingerprint, alert["ts"] - window_s),
    )
    if row is None:
        return None
    first: dict[str, Any] = orjson.loads(row[1])
    last_seen = max(first["last_seen_at"], alert["ts"])
    first.update(count=first["count"] + 1, last_seen_at=last_seen, risk_score=alert["risk_score"])
    await conn.execute(
        "UPDATE alerts SET count = ?, last_seen_at = ?, body = ? WHERE id = ?",
        (first["count"], last_seen, orjson.dumps(first), row[0]),
    )
    return first


async def _queue_siem(conn: Conn, kind: str, bodies: list[dict[str, Any]], now: float) -> None:
    """Queue items for the SIEM; each body is fixed now, as JSON."""
    await conn.executemany(
        "INSERT INTO siem_queue (kind, body, created_at, next_attempt_at) VALUES (?, ?, ?, ?)",
        [(kind, orjson.dumps(body), now, now) for body in bodies],
    )


def _severe_enough(severity: str | None, minimum: str | None) -> bool:
    # `min_severity` filters what has a severity (alerts) and nothing else.
    return severity is None or minimum is None or SEVERITY_ORDER[severity] >= SEVERITY_ORDER[minimum]


_HEARTBEAT_COLUMNS = ("cpu_percent", "mem_percent", "disk_percent", "spool_depth", "dropped", "uptime_s")
_INSERT_HEARTBEAT_SQL = (
    f"INSERT INTO heartbeats (agent_id, ts, {', '.join(_HEARTBEAT_COLUMNS)}) "  # noqa: S608 - column names come from code
    f"VALUES (?, ?{', ?' * len(_HEARTBEAT_COLUMNS)}) ON CONFLICT (agent_id, ts) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _HEARTBEAT_COLUMNS)
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
