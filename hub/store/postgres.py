"""PostgreSQL backend, for several hub nodes sharing one database: asyncpg, group commit per node.

The store's SQL is written with `?` placeholders; they become `$1, $2...` here. Each node has
one writer, on a connection of its own, as on SQLite: it commits every waiting job together.
Writes that read what they then change (an audit chain, a lease, a count against a limit) are
`exclusive`: they commit in a transaction of their own that first takes one advisory lock, so
nodes run them one at a time, as SQLite's write lock does. Event and heartbeat writes are
plain upserts, committed apart from them, and never wait for that lock.
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar, Unpack

import asyncpg

from hub.store.sql import Conn, SqlStore, StoreOptions, WriteJob, migrations

log = logging.getLogger(__name__)
T = TypeVar("T")
# Advisory locks: one for exclusive writes, one for migrations (so nodes starting together apply
# each migration once). Advisory locks are database-wide: keyed by the schema too, hubs sharing
# a database in schemas of their own (separate deployments, test runs) never wait for each other.
_EXCLUSIVE_WRITE_LOCK = 0x4147_4E01
_MIGRATION_LOCK = 0x4147_4E02
# With no schema on the search path, current_schema() is NULL, and a NULL key would take no lock.
_TAKE_LOCK = "SELECT pg_advisory_xact_lock(hashtext(coalesce(current_schema(), '')), $1)"


@functools.lru_cache(maxsize=128)  # event inserts vary by batch size; each is tens of KiB
def numbered(sql: str) -> str:
    """`sql` with its `?` placeholders as PostgreSQL's `$1, $2...`, or its `?N` as `$N` (quoted
    text left alone)."""
    out: list[str] = []
    count, given, quoted = 0, False, False
    for index, char in enumerate(sql):
        if char == "'":
            quoted = not quoted
        if char == "?" and not quoted:
            if sql[index + 1 : index + 2].isdigit():  # ?N: its digits follow as they are
                given = True
                out.append("$")
            else:
                count += 1
                out.append(f"${count}")
        else:
            out.append(char)
    if count and given:  # SQLite would number a plain ? after the highest ?N: not worth copying
        raise ValueError(f"a statement mixes ? and ?N placeholders: {sql[:80]}")
    return "".join(out)


def _storable(params: Sequence[Any]) -> Sequence[Any]:
    # PostgreSQL text cannot hold NUL (SQLite can): such a character, which only hostile or
    # broken input carries (a hostname, a request path), is stored as U+FFFD instead.
    if any(isinstance(value, str) and "\x00" in value for value in params):
        return [value.replace("\x00", "\ufffd") if isinstance(value, str) else value for value in params]
    return params


def _changed(status: str) -> int:
    # asyncpg answers a command's tag: "UPDATE 3", "DELETE 0", "INSERT 0 1".
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


class PostgresConn:
    """`Conn` over one asyncpg connection."""

    __slots__ = ("_db",)

    def __init__(self, db: asyncpg.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._db.fetch(numbered(sql), *_storable(params)))

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return await self._db.fetchrow(numbered(sql), *_storable(params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _changed(await self._db.execute(numbered(sql), *_storable(params)))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(numbered(sql), [_storable(row) for row in rows])

    async def begin(self, *, exclusive: bool) -> None:
        await self._db.execute("BEGIN")
        if exclusive:  # released by COMMIT or ROLLBACK
            await self._db.execute(_TAKE_LOCK, _EXCLUSIVE_WRITE_LOCK)

    async def rollback(self) -> None:
        try:
            if self._db.is_in_transaction():
                await self._db.execute("ROLLBACK")
        except asyncpg.InterfaceError:  # the connection is gone, and the transaction with it
            pass


class PostgresStore(SqlStore):
    """The shared store of several hub nodes."""

    # The database down or restarting, a connection lost, a statement past its timeout.
    storage_errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        command_timeout_s: float = 30.0,
        **options: Unpack[StoreOptions],
    ):
        super().__init__(**options)
        self._dsn = dsn
        self._pool_size = pool_size
        self._command_timeout_s = command_timeout_s
        self._readers: asyncpg.Pool | None = None
        self._writer: asyncpg.Pool | None = None

    async def open(self) -> None:
        # The writer has a connection of its own: reads however slow or many never hold up
        # the commits that acks wait for.
        self._writer = await self._pool(1)
        self._readers = await self._pool(self._pool_size)
        async with self._writer.acquire() as conn, conn.transaction():
            await conn.execute(_TAKE_LOCK, _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for version, script in migrations("postgresql"):
                if version > current:
                    log.info("applying migration %04d", version)
                    await conn.execute(script)
                    await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
        self._start_writer()

    async def _pool(self, size: int) -> asyncpg.Pool:
        try:
            return await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=size,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": "agenthub"},
            )
        except (*self.storage_errors, ValueError) as exc:
            where = urllib.parse.urlsplit(self._dsn)  # named without its password
            raise ConnectionError(f"PostgreSQL at {where.hostname}:{where.port or 5432}{where.path} "
                                  f"(database_url) does not answer: {exc}") from None  # fmt: skip

    async def close(self) -> None:
        await self._stop_writer()
        for pool in (self._readers, self._writer):
            if pool is not None:
                await pool.close()
        self._readers = self._writer = None

    async def clock(self) -> float | None:
        row = await self._read(lambda c: c.fetchrow("SELECT extract(epoch FROM clock_timestamp())::float8"))
        return float(row[0])

    async def _read(self, run: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        assert self._readers is not None
        async with self._readers.acquire() as conn:
            return await run(PostgresConn(conn))

    async def _commit(self, group: list[WriteJob]) -> list[tuple[bool, Any]]:
        # Exclusive jobs commit in a transaction of their own, after the rest: the lock they
        # take must not make every other node's event batches wait behind this group.
        plain = [job for job in group if not job.exclusive]
        exclusive = [job for job in group if job.exclusive]
        outcomes: dict[int, tuple[bool, Any]] = {}
        assert self._writer is not None
        async with self._writer.acquire() as conn:
            for part in (plain, exclusive):
                if not part:
                    continue
                try:
                    results = await self.run_group(PostgresConn(conn), part)
                except self.storage_errors as exc:  # this part failed, not what committed before it
                    results = [(False, exc)] * len(part)
                outcomes.update((id(job), outcome) for job, outcome in zip(part, results, strict=True))
        return [outcomes[id(job)] for job in group]
