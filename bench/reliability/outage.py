"""The store unavailable while agents stream: `unavailable` answers, no false ack, nothing lost.

The hub runs as its own process (`agenthub serve`, TLS, a throwaway folder, as in
`kill9.py`), on SQLite or on PostgreSQL; 50 of the project's own `AgentSession`s stream to it
from this process, each with its own spool, fed by the same paced, deterministic source as
kill9's. After a warm-up the store becomes unavailable for `--outage-s` seconds, then comes
back; the sources produce throughout. Then they stop, every spool must empty, the hub stops,
and each agent's stored seqs must be exactly 1..produced with the content it produced.

How the store goes away:

- SQLite: another process (this module with `--hold-lock`) opens the hub's database and
  holds its write lock (`BEGIN EXCLUSIVE`) for the outage, then rolls back. The hub's writes
  wait `HUB_SQLITE_BUSY_TIMEOUT_S` for it, then fail and are answered `unavailable`.
- PostgreSQL: the hub reaches the machine's server (127.0.0.1:5432, database `test`, a fresh
  schema dropped afterwards) only through a TCP relay this script runs (this module with
  `--relay`, a free loopback port). For the outage the relay resets every open connection and
  closes its listener, so new connections are refused: exactly what a stopped server looks
  like to a client. The machine's PostgreSQL itself is never stopped (other work uses it).

No false ack: during the outage nothing can be committed, so every ack that arrives then must
be for events committed before it began. The script reads what was committed at the start
of the outage (SQLite: the lock holder reads it under its lock; PostgreSQL: this script reads
it straight from the server once the relay has cut the hub off) and every event acked during
the outage must be in it. Afterwards every event ever acked must be stored, once.

PASS when: every agent got `unavailable` answers during the outage, no false ack, the hub
stayed up and stopped cleanly, the backlog (what the agents produced but had no ack for when
the store came back) was acked within `--drain-limit` seconds, every spool emptied, and every
agent's stored events are exactly what it produced, each once.

    python -m bench.reliability.outage [--store sqlite|postgresql] [--agents 50] [--outage-s 30]
                                       [--rate 100] [--warmup-s 10] [--drain-limit 60] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import shutil
import socket
import sqlite3
import struct
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import asyncpg

from agent_client.wire import Event
from bench.harness import free_port
from bench.reliability.kill9 import (
    HOST,
    Agents,
    HubProcess,
    Snapshot,
    SoakError,
    StoreCheck,
    Tally,
    add_run_options,
    agent_ids,
    agent_logs,
    check_agent,
    check_store,
    hub_env,
    make_pki,
    parse_setting,
    run_and_report,
)
from hub.config import Settings

Store = Literal["sqlite", "postgresql"]
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"  # the machine's server
_MODULE = "bench.reliability.outage"  # the helpers (lock holder, relay) run this module again
_ROOT = Path(__file__).resolve().parents[2]
_HELPER_LIMIT_S = 60.0  # longest a helper may take to answer (the lock waits for the hub's commit)
_POLL_S = 0.1
_STREAMING_LIMIT_S = 30.0  # after the warm-up, longest wait for an agent's first ack
_SHOWN_PROBLEMS = 20


class StoreUnreachableError(SoakError):
    """The PostgreSQL server does not answer (nothing was run)."""


@dataclass(frozen=True)
class Config:
    """One run's shape; the defaults are `make soak`'s."""

    store: Store = "sqlite"
    agents: int = 50
    rate: float = 100.0  # events/s each agent produces
    warmup_s: float = 10.0  # streaming before the outage
    outage_s: float = 30.0
    tail_s: float = 5.0  # streaming after the backlog drained, before the sources stop
    drain_limit_s: float = 60.0  # the backlog must be acked this soon after the store is back
    postgres_url: str = POSTGRES_URL
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**32))
    workdir: Path | None = None  # a fresh temporary folder when None
    keep: bool = False  # keep the folder (and the PostgreSQL schema) after a pass
    # extra HUB_* settings, e.g. (("SQLITE_BUSY_TIMEOUT_S", "1"),)
    hub_settings: tuple[tuple[str, str], ...] = ()


# --- the agents' side -----------------------------------------------------------------------


@dataclass
class Window:
    """When the store was out; every tally reads `open` as each answer arrives."""

    opened_at: float | None = None  # time.monotonic()
    closed_at: float | None = None

    @property
    def open(self) -> bool:
        return self.opened_at is not None and self.closed_at is None

    @property
    def elapsed_s(self) -> float:
        """How long the store has been out (so far, or in all)."""
        if self.opened_at is None:
            return 0.0
        return (self.closed_at or time.monotonic()) - self.opened_at

    def open_now(self) -> None:
        self.opened_at = time.monotonic()

    def close_now(self) -> None:
        self.closed_at = time.monotonic()


@dataclass
class OutageTally(Tally):
    """A tally that also tells the answers received during the outage apart."""

    window: Window = field(default_factory=Window)
    outage_refusals: Counter[str] = field(default_factory=Counter)
    outage_acks: int = 0
    outage_acked: set[int] = field(default_factory=set)  # seqs of batches acked during the outage

    def record(self, events: list[Event], ack: dict[str, Any]) -> None:
        super().record(events, ack)
        if self.window.open:
            self.outage_acks += 1
            self.outage_acked.update(event["seq"] for event in events)

    def refuse(self, error: Any) -> None:
        super().refuse(error)
        if self.window.open:
            self.outage_refusals[str(error.get("code") if isinstance(error, dict) else error)] += 1


# --- the outage -----------------------------------------------------------------------------


Committed = dict[str, set[int]]  # agent id -> seqs committed


class Outage(Protocol):
    """A way to take the store away and bring it back."""

    async def begin(self, window: Window) -> Committed:
        """Take the store away, open `window` once nothing can commit, return what was committed."""
        ...

    async def end(self, window: Window) -> None:
        """Close `window`, then bring the store back."""
        ...

    async def close(self) -> None:
        """Stop whatever helper runs (the store comes back if it was still away)."""
        ...


class _Helper:
    """A helper process (this module again) that answers one line on stdout per line on stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    @classmethod
    async def start(cls, name: str, log: Path, *args: str) -> _Helper:
        with log.open("ab") as errors:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", _MODULE, *args, cwd=_ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=errors,
            )  # fmt: skip
        return cls(proc, name, log)

    async def expect(self, word: str) -> str:
        """Wait for the helper's next line, which must start with `word`; return the rest."""
        assert self.proc.stdout is not None
        try:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), _HELPER_LIMIT_S)).decode()
        except TimeoutError:
            raise SoakError(f"the {self.name} did not say {word!r} within {_HELPER_LIMIT_S:.0f} s") from None
        if not line.startswith(word):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise SoakError(f"the {self.name} said {line!r}, not {word!r}\n{tail}")
        return line[len(word) :].strip()

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: the helper undoes what it did and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class SqliteLock:
    """Another process holds the database's write lock for the outage."""

    def __init__(self, db_path: Path, workdir: Path) -> None:
        self.db_path = db_path
        self.workdir = workdir
        self._holder: _Helper | None = None

    async def begin(self, window: Window) -> Committed:
        committed = self.workdir / "committed.json"
        self._holder = holder = await _Helper.start(
            "lock holder", self.workdir / "helpers.log", "--hold-lock", str(self.db_path),
            "--committed", str(committed),
        )  # fmt: skip
        await holder.expect("locked")
        window.open_now()  # from here on nothing commits until `end`
        await holder.expect("committed")
        return {agent_id: set(seqs) for agent_id, seqs in json.loads(committed.read_text()).items()}

    async def end(self, window: Window) -> None:
        window.close_now()  # before the lock goes: an ack after it may be for a new commit
        assert self._holder is not None
        await self._holder.say("release")
        await self._holder.expect("released")

    async def close(self) -> None:
        if self._holder is not None:
            await self._holder.close()


class PostgresStop:
    """The relay between hub and server plays a stopped server for the outage."""

    def __init__(self, relay: _Helper, direct_url: str) -> None:
        self.relay = relay
        self.direct_url = direct_url  # the server itself, past the relay

    @classmethod
    async def start(
        cls, upstream: tuple[str, int], direct_url: str, workdir: Path
    ) -> tuple[PostgresStop, int]:
        """Start the relay in front of `upstream`; return it and the port the hub must use."""
        port = free_port()
        relay = await _Helper.start(
            "relay",
            workdir / "helpers.log",
            "--relay",
            str(port),
            "--upstream",
            f"{upstream[0]}:{upstream[1]}",
        )
        await relay.expect("listening")
        return cls(relay, direct_url), port

    async def begin(self, window: Window) -> Committed:
        await self.relay.say("stop")
        await self.relay.expect("stopped")
        # Every connection of the hub is reset: no commit result can reach it any more. A commit
        # it had the result of was visible before that, so the read below sees it.
        window.open_now()
        return await _committed_postgres(self.direct_url)

    async def end(self, window: Window) -> None:
        window.close_now()
        await self.relay.say("start")
        await self.relay.expect("started")

    async def close(self) -> None:
        await self.relay.close()


async def _committed_postgres(url: str) -> Committed:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        committed: Committed = defaultdict(set)
        for agent_id, seq in await conn.fetch("SELECT agent_id, seq FROM events"):
            committed[agent_id].add(seq)
        return committed
    finally:
        await conn.close()


# --- the helpers (run as this module with --hold-lock or --relay) ----------------------------


def hold_lock(db_path: Path, committed: Path) -> None:
    """Hold the database's write lock until a line (or the end) on stdin; write what was committed."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=_HELPER_LIMIT_S)
    try:
        # In WAL mode EXCLUSIVE takes the one write lock; readers go on, writers wait.
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        seqs: dict[str, list[int]] = defaultdict(list)
        for agent_id, seq in conn.execute("SELECT agent_id, seq FROM events"):
            seqs[agent_id].append(seq)
        committed.write_text(json.dumps(seqs))
        print("committed", flush=True)
        sys.stdin.readline()
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    print("released", flush=True)


class Relay:
    """A TCP relay that can play a stopped server: reset every connection, refuse new ones."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.port = port
        self.upstream = upstream
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every relayed connection
        self._relaying: set[asyncio.Task[Any]] = set()

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, self.port)

    async def stop(self) -> int:
        """Close the listener (new connections are refused), reset every open one; return how many."""
        if self._server is not None:
            self._server.close()
            self._server = None
        ends = list(self._open)
        for end in ends:
            _reset(end)
        self._open.clear()
        return len(ends) // 2

    async def _relay(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)
        try:
            server_reader, server = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client)
            return
        if self._server is None:  # stopped while this one connected
            _reset(client)
            _reset(server)
            return
        self._open.update((client, server))
        await asyncio.gather(_pump(client_reader, server), _pump(server_reader, client))
        self._open.difference_update((client, server))

    async def serve(self) -> None:
        """Obey `stop` and `start` lines on stdin; at the end of input close everything and return."""
        loop = asyncio.get_running_loop()
        commands = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        await self.listen()
        print("listening", flush=True)
        while line := (await commands.readline()).decode().strip():
            if line == "stop":
                print(f"stopped {await self.stop()}", flush=True)
            elif line == "start":
                await self.listen()
                print("started", flush=True)
        await self.close()

    async def close(self) -> None:
        """Stop, and wait until every connection's task has ended (nothing is left to cancel)."""
        await self.stop()
        await asyncio.gather(*self._relaying)


def _reset(end: asyncio.StreamWriter) -> None:
    # SO_LINGER 0: closing sends RST, as a server that went away does, not a polite FIN.
    sock = end.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    end.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()  # one side gone: the other goes too


# --- the run --------------------------------------------------------------------------------


@dataclass
class Report:
    """The run's outcome and figures."""

    config: Config
    workdir: Path
    outage_s: float = 0.0  # as it happened
    refusals: Counter[str] = field(default_factory=Counter)  # error answers during the outage, by code
    refusals_after: Counter[str] = field(default_factory=Counter)  # ... outside it
    agents_told: int = 0  # agents that got `unavailable` during the outage
    outage_acks: int = 0  # acks received during the outage
    false_acks: int = 0  # events acked during the outage that were not committed before it
    backlog: int = 0  # events produced but not acked when the store came back
    drain_s: float | None = None  # until that backlog was acked
    produced: int = 0
    stored: int = 0
    lost: int = 0
    twice: int = 0
    acked: int = 0
    acked_lost: int = 0
    duplicates: int = 0  # resends the hub acked as already stored
    timeouts: int = 0  # batches without an answer within the session's call timeout
    hub_exit: int | None = None
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check held."""
        return not self.problems

    def summary(self) -> str:
        """Return the one PASS/FAIL line."""
        config = self.config
        verdict = "PASS" if self.passed else "FAIL"
        answers = (
            ", ".join(f"{count:,} {code}" for code, count in sorted(self.refusals.items())) or "no errors"
        )
        drain = (
            f"in {self.drain_s:.1f} s" if self.drain_s is not None else f"NOT in {config.drain_limit_s:g} s"
        )
        hub = "hub up throughout, stopped cleanly" if self.hub_exit == 0 else f"hub exit {self.hub_exit}"
        settings = "".join(f", HUB_{name}={value}" for name, value in config.hub_settings)
        return (
            f"{verdict} outage ({config.store}): {self.outage_s:.1f} s outage, {config.agents} agents at "
            f"{config.rate:g} events/s; during it {answers} answers "
            f"({self.agents_told}/{config.agents} agents told unavailable), {self.outage_acks:,} acks, "
            f"{self.false_acks:,} events falsely acked; backlog {self.backlog:,} events acked {drain} "
            f"after the store came back; {self.produced:,} produced, {self.stored:,} stored, "
            f"{self.lost:,} lost, {self.twice:,} stored twice, {self.acked_lost:,} acked but not stored, "
            f"{self.duplicates:,} resends deduped, {self.timeouts:,} ack timeouts; {hub}; "
            f"{self.elapsed_s:.1f} s (seed {config.seed}{settings})"
        )


async def outage(config: Config, out: Callable[[str], None] = print) -> Report:
    """Run the outage check and return its report (see the module docstring)."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="outage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    report = Report(config, workdir)
    async with _database(config, workdir) as (hub_url, direct_url, store_outage):
        out(
            f"outage: {config.store}, {config.agents} agents at {config.rate:g} events/s each, "
            f"{config.warmup_s:g} s warm-up, {config.outage_s:g} s outage; folder {workdir}"
            + "".join(f"; HUB_{name}={value}" for name, value in _with_url(config.hub_settings, hub_url))
            + _busy_timeout(config)
        )
        port = free_port()
        settings = config.hub_settings
        await make_pki(
            workdir, agent_ids(config.agents), hub_env(workdir, port, _with_url(settings, direct_url))
        )
        hub = HubProcess(workdir, port, hub_env(workdir, port, _with_url(settings, hub_url)))
        run = _Run(config, report, hub, store_outage, out)
        with agent_logs(workdir / "agents.log"):
            await run.run()
        await run.final_check(direct_url)
    report.elapsed_s = time.monotonic() - began
    if report.passed and not config.keep and config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _busy_timeout(config: Config) -> str:
    if config.store != "sqlite" or any(name == "SQLITE_BUSY_TIMEOUT_S" for name, _ in config.hub_settings):
        return ""
    return f"; HUB_SQLITE_BUSY_TIMEOUT_S {Settings.model_fields['sqlite_busy_timeout_s'].default:g} (default)"


def _with_url(settings: tuple[tuple[str, str], ...], url: str | None) -> tuple[tuple[str, str], ...]:
    return settings if url is None else (("DATABASE_URL", url), *settings)


@contextlib.asynccontextmanager
async def _database(config: Config, workdir: Path) -> AsyncIterator[tuple[str | None, str | None, Outage]]:
    """Yield (the hub's database URL, the server's own URL, the outage); None URLs on SQLite."""
    if config.store == "sqlite":
        yield None, None, SqliteLock(workdir / "data" / "hub.db", workdir)
        return
    parts = urllib.parse.urlsplit(config.postgres_url)
    schema = "agenthub_outage_" + secrets.token_hex(6)
    direct = f"{config.postgres_url}?search_path={schema}"
    try:
        conn = await asyncpg.connect(config.postgres_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreUnreachableError(f"PostgreSQL at {parts.hostname}:{parts.port or 5432}: {exc}") from exc
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        stop, port = await PostgresStop.start((parts.hostname or HOST, parts.port or 5432), direct, workdir)
        try:
            user = f"{parts.username}@" if parts.username else ""
            relayed = parts._replace(netloc=f"{user}{HOST}:{port}", query=f"search_path={schema}")
            yield urllib.parse.urlunsplit(relayed), direct, stop
        finally:
            await stop.close()
            if not config.keep:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


class _Run:
    """One run: warm-up, outage, backlog, drain, checks."""

    def __init__(
        self,
        config: Config,
        report: Report,
        hub: HubProcess,
        store_outage: Outage,
        out: Callable[[str], None],
    ) -> None:
        self.config = config
        self.report = report
        self.hub = hub
        self.outage = store_outage
        self.out = out
        self.window = Window()
        url = f"https://{HOST}:{hub.port}"
        self.agents = Agents(
            config.agents, config.rate, report.workdir, url, random.Random(config.seed),
            tally=lambda agent_id: OutageTally(agent_id, window=self.window),
        )  # fmt: skip

    @property
    def tallies(self) -> list[OutageTally]:
        return [cast(OutageTally, session.tally) for session in self.agents.sessions]  # made by our factory

    async def run(self) -> None:
        await self.hub.start()
        self.agents.start()
        try:
            await asyncio.sleep(self.config.warmup_s)
            await self._streaming()
            await self._outage()
            await self._backlog()
            await asyncio.sleep(self.config.tail_s)
            self.report.problems += await self.agents.drain(self.config.drain_limit_s)
        finally:
            self.report.problems += await self.agents.stop()
            if not self.hub.alive():
                self.report.problems.append(f"the hub died\n{self.hub.log_tail()}")
            else:
                self.report.hub_exit = await self.hub.stop()
                if self.report.hub_exit != 0:
                    self.report.problems.append(
                        f"the hub stopped with {self.report.hub_exit}\n{self.hub.log_tail()}"
                    )
            await self.outage.close()  # after the hub: on PostgreSQL the relay is its way to the store

    async def _streaming(self) -> None:
        """Wait until every agent has had an ack: the outage must meet them all streaming."""
        waited = time.monotonic()
        while not all(t.acks for t in self.tallies):
            if time.monotonic() - waited > _STREAMING_LIMIT_S:
                idle = [t.agent_id for t in self.tallies if not t.acks]
                raise SoakError(f"{len(idle)} agents had no ack after the warm-up: {idle[:5]}")
            await asyncio.sleep(_POLL_S)

    async def _outage(self) -> None:
        stored = sum(len(t.acked) for t in self.tallies)
        committed = await self.outage.begin(self.window)
        try:
            self.out(
                f"outage begins: {stored:,} events acked so far, "
                f"{sum(map(len, committed.values())):,} committed"
            )
            await asyncio.sleep(max(0.0, self.config.outage_s - self.window.elapsed_s))
        finally:
            await self.outage.end(self.window)
        self.report.outage_s = self.window.elapsed_s
        if not self.hub.alive():
            raise SoakError(f"the hub died during the outage\n{self.hub.log_tail()}")
        for tally in self.tallies:
            if false := tally.outage_acked - committed.get(tally.agent_id, set()):
                self.report.false_acks += len(false)
                self.report.problems.append(
                    f"{tally.agent_id}: {len(false)} events acked during the outage were not committed "
                    f"before it, seqs {sorted(false)[:5]}"
                )
            if not tally.outage_refusals["unavailable"]:
                self.report.problems.append(f"{tally.agent_id}: no `unavailable` answer during the outage")
        report = self.report
        report.refusals = sum((t.outage_refusals for t in self.tallies), Counter())
        report.agents_told = sum(bool(t.outage_refusals["unavailable"]) for t in self.tallies)
        report.outage_acks = sum(t.outage_acks for t in self.tallies)
        self.out(
            f"outage ends after {report.outage_s:.1f} s: {dict(report.refusals)} answered during it, "
            f"{report.outage_acks} acks, {report.false_acks} events falsely acked"
        )

    async def _backlog(self) -> None:
        """Wait until every agent has an ack for what it had produced when the store came back."""
        sessions = self.agents.sessions
        due = [s.tally.produced for s in sessions]
        self.report.backlog = sum(d - s.acked_seq for s, d in zip(sessions, due, strict=True))
        back = time.monotonic()
        while time.monotonic() - back < self.config.drain_limit_s:
            if all(s.acked_seq >= d for s, d in zip(sessions, due, strict=True)):
                self.report.drain_s = time.monotonic() - back
                self.out(f"backlog of {self.report.backlog:,} events acked in {self.report.drain_s:.1f} s")
                return
            await asyncio.sleep(_POLL_S)
        behind = sum(s.acked_seq < d for s, d in zip(sessions, due, strict=True))
        self.report.problems.append(
            f"{behind} agents still had backlog unacked {self.config.drain_limit_s:g} s after the outage"
        )

    async def final_check(self, direct_url: str | None) -> None:
        """Check the store against what the agents produced and were acked (the hub is stopped)."""
        snapshots = self.agents.snapshots()
        if direct_url is None:
            db_path = self.report.workdir / "data" / "hub.db"
            check = await asyncio.to_thread(check_store, db_path, snapshots, final=True)
        else:
            check = await _check_postgres(direct_url, snapshots)
        report = self.report
        report.problems += check.problems
        for tally in self.tallies:
            if tally.rejected:
                report.problems.append(f"{tally.agent_id}: the hub rejected {tally.rejected} events")
            report.refusals_after += tally.refusals - tally.outage_refusals
        report.produced = sum(t.produced for t in self.tallies)
        report.stored, report.lost, report.twice = check.rows, check.missing, check.twice
        report.acked, report.acked_lost = check.acked, check.acked_lost
        report.duplicates = sum(t.duplicates for t in self.tallies)
        report.timeouts = sum(t.timeouts for t in self.tallies)
        self.out(
            f"final: {check.rows:,} stored of {report.produced:,} produced"
            + (f", integrity {check.integrity}" if check.integrity else "")
            + f"; answered outside the outage: {dict(report.refusals_after) or 'nothing but acks'}"
        )


async def _check_postgres(url: str, snapshots: list[Snapshot]) -> StoreCheck:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT agent_id, seq, body FROM events ORDER BY agent_id, seq")
    finally:
        await conn.close()
    by_agent: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    for agent_id, seq, body in rows:
        by_agent[agent_id].append((seq, body))
    check = StoreCheck()
    for snap in snapshots:
        check_agent(by_agent.get(snap.agent_id, []), snap, check, final=True)
    if len(rows) != check.rows:
        check.problems.append(f"{len(rows) - check.rows} stored events belong to no soak agent")
    return check


def main(argv: list[str] | None = None) -> None:
    """Run the check from the command line (or one of its helpers); exit 1 on FAIL."""
    defaults = Config()
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default=defaults.store)
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="events/s per agent")
    parser.add_argument(
        "--warmup-s", type=float, default=defaults.warmup_s, help="streaming before the outage"
    )
    parser.add_argument(
        "--outage-s", type=float, default=defaults.outage_s, help="how long the store is away"
    )
    parser.add_argument(
        "--tail-s", type=float, default=defaults.tail_s, help="streaming after the backlog drained"
    )
    parser.add_argument(
        "--drain-limit", type=float, default=defaults.drain_limit_s,
        help="seconds the backlog may take to be acked once the store is back (and the spools to empty)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres-url", default=defaults.postgres_url, help="the server (a schema is made there)"
    )
    add_run_options(
        parser,
        repeats="agent offsets",
        folder="certificates, data, spools and logs",
        keep="folder and schema",
    )
    # The helpers this script starts: this module again, in another process.
    parser.add_argument("--hold-lock", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--committed", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold_lock is not None:
        hold_lock(args.hold_lock, args.committed)
        return
    if args.relay is not None:
        host, _, upstream_port = args.upstream.rpartition(":")
        asyncio.run(Relay(args.relay, (host, int(upstream_port))).serve())
        return
    config = Config(
        store=args.store, agents=args.agents, rate=args.rate, warmup_s=args.warmup_s, outage_s=args.outage_s,
        tail_s=args.tail_s, drain_limit_s=args.drain_limit, postgres_url=args.postgres_url,
        workdir=args.workdir, keep=args.keep, hub_settings=tuple(map(parse_setting, args.hub_setting)),
        **({"seed": args.seed} if args.seed is not None else {}),
    )  # fmt: skip
    run_and_report(
        f"outage ({config.store})", outage(config), kept="hub.log, agents.log, helpers.log, data/, spools/"
    )


if __name__ == "__main__":
    main()
