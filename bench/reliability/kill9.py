"""kill -9 the hub at random moments while agents stream; every acked event must be stored once.

The hub runs as its own process (`agenthub serve`, TLS, a throwaway data folder, development
certificates made with `agenthub certs`). It is killed with SIGKILL at seeded random moments
and restarted on the same folder. The agents are the project's own `AgentSession`s in this
process, each with its own certificate and SQLite spool, fed by a paced, deterministic
source: event n of an agent gets seq n and the path /var/lib/soak/<agent>/n.

After every kill, with the hub dead, the database is opened read-only and must pass
`PRAGMA integrity_check`, hold no (agent, seq) twice, hold every event any agent has an ack
for, and hold nothing an agent did not produce. At the end the sources stop, the agents
empty their spools into the last hub, the hub stops, and each agent's stored seqs must be
exactly 1..produced with the content it produced, and every stored batch must have been scored
(those a kill left unscored are scored when their agent comes back).

    python -m bench.reliability.kill9 [--agents 50] [--kills 25] [--rate 100] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import msgpack
import psutil

from agent_client.session import AgentSession
from agent_client.wire import Event
from bench.harness import free_port

HOST = "127.0.0.1"
_TICK_S = 0.2  # a source hands its due events over in one burst per tick: one spool commit
_LAG_PROBE_S = 0.05
_START_LIMIT_S = 30.0
_STOP_LIMIT_S = 30.0
_SAMPLE = 5  # seqs named in a problem
_SHOWN_PROBLEMS = 20


class SoakError(Exception):
    """The run could not go on (a tool failed, the hub would not start)."""


@dataclass(frozen=True)
class Config:
    """One run's shape; the defaults are `make soak`'s."""

    agents: int = 50
    kills: int = 25
    rate: float = 100.0  # events/s each agent produces
    min_up_s: float = 0.1  # the hub runs this long at least before a kill, once listening
    max_up_s: float = 10.0
    tail_s: float = 3.0  # streaming after the last restart before the sources stop
    drain_limit_s: float = 120.0
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**32))
    workdir: Path | None = None  # a fresh temporary folder when None
    keep: bool = False  # keep the folder after a pass (it is always kept after a failure)
    hub_settings: tuple[tuple[str, str], ...] = ()  # extra HUB_* settings, e.g. (("MAX_BATCH_EVENTS", "10"),)


# --- the agents' side -----------------------------------------------------------------------


@dataclass
class Tally:
    """What one agent produced and what the hub acked to it."""

    agent_id: str
    produced: int = 0
    acked: set[int] = field(default_factory=set)
    acks: int = 0
    duplicates: int = 0  # events acked as already stored: resends the hub deduped
    rejected: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # error answers to batches, by code
    timeouts: int = 0  # batches the hub did not answer in time

    def record(self, events: list[Event], ack: dict[str, Any]) -> None:
        """Count an ack without error for the batch `events`."""
        refused = {item.get("index") for item in ack.get("rejected") or [] if isinstance(item, dict)}
        self.acked.update(event["seq"] for index, event in enumerate(events) if index not in refused)
        self.rejected += len(refused)
        self.duplicates += int(ack.get("duplicates") or 0)
        self.acks += 1

    def refuse(self, error: Any) -> None:
        """Count an error answer to a batch (the session keeps the batch and retries it)."""
        self.refusals[str(error.get("code") if isinstance(error, dict) else error)] += 1


class RecordingSession(AgentSession):
    """An `AgentSession` that reports every answer to a batch to its tally.

    The session exposes only `acked_seq`, the acked prefix. Per-batch acks pass through
    `_call`, the one place where an ack meets the batch it answers; this is the seam.
    """

    def __init__(self, tally: Tally, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tally = tally

    async def _call(self, event: str, data: Any, wait_s: float | None = None) -> Any:
        if event != "events" or not isinstance(data, dict):
            return await super()._call(event, data, wait_s)
        try:
            ack = await super()._call(event, data, wait_s)
        except TimeoutError:
            self.tally.timeouts += 1
            raise
        if isinstance(ack, dict) and ack.get("error"):
            self.tally.refuse(ack["error"])
        elif isinstance(ack, dict):
            self.tally.record(data["events"], ack)
        return ack


def soak_path(agent_id: str, n: int) -> str:
    """Return the path carried by event `n` of `agent_id` (what the store must give back)."""
    return f"/var/lib/soak/{agent_id}/{n}"


async def paced_events(tally: Tally, rate: float, stop: asyncio.Event) -> AsyncIterator[Event]:
    """Yield `rate` events a second, in one burst per tick, until `stop` is set."""
    start = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - start) * rate)
        while tally.produced < due:
            n = tally.produced + 1
            yield {"ts": time.time(), "kind": "file_open", "pid": 1000 + n % 16, "uid": 1000,
                   "path": soak_path(tally.agent_id, n)}  # fmt: skip
            tally.produced = n  # counted once taken: the consumer asked for the next one
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _TICK_S)


# --- the hub process ------------------------------------------------------------------------


def _agenthub() -> list[str]:
    script = Path(sys.executable).with_name("agenthub")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hub.cli"]


def hub_env(workdir: Path, port: int, settings: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    # A developer's own HUB_* settings must not leak into the run.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HUB_")}
    env.update(
        HUB_HOST=HOST,
        HUB_PORT=str(port),
        HUB_DATA_DIR=str(workdir / "data"),
        HUB_CERTS_DIR=str(workdir / "certs"),
        HUB_NODE_ID="soak",
    )
    env.update((f"HUB_{name.upper()}", value) for name, value in settings)
    return env


async def make_pki(workdir: Path, agent_ids: list[str], env: dict[str, str]) -> None:
    """Create the CA, the server certificate and one certificate per agent with `agenthub certs`."""
    certs, data = str(workdir / "certs"), str(workdir / "data")
    await _run_tool(workdir, env, "certs", "init", "--dir", certs, "--hostname", HOST)
    first, *others = agent_ids
    # The first issue creates the database alone: two `agenthub` processes opening a new
    # database at once can fail ("database is locked" while one switches it to WAL, or
    # "table events already exists" when both apply the first migration).
    await _run_tool(workdir, env, "certs", "issue", first, "--dir", certs, "--data-dir", data)
    limit = asyncio.Semaphore(os.cpu_count() or 1)

    async def issue(agent_id: str) -> None:
        async with limit:
            await _run_tool(workdir, env, "certs", "issue", agent_id, "--dir", certs, "--data-dir", data)

    # Let every issue finish before raising: cancelling asyncio's subprocess creation midway
    # can leave a task that never ends (seen on Python 3.11), and the run would hang.
    outcomes = await asyncio.gather(*(issue(agent_id) for agent_id in others), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _run_tool(workdir: Path, env: dict[str, str], *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_agenthub(), *args, cwd=workdir, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    if proc.returncode:
        raise SoakError(f"agenthub {' '.join(args)} exited with {proc.returncode}: {output.decode()[-2000:]}")


class HubProcess:
    """`agenthub serve` on a fixed port and data folder: started, killed, restarted."""

    def __init__(self, workdir: Path, port: int, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = port
        self.env = env
        self.log_path = workdir / "hub.log"
        self.starts = 0
        self.cpu_s = 0.0  # CPU the hub processes used, summed over their lives
        self.lived_s = 0.0  # their lives, start-up included
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._spawned_at = 0.0

    async def start(self) -> float:
        """Start the hub and return how long it took to listen."""
        self.starts += 1
        self._spawned_at = began = time.monotonic()
        self._log = self.log_path.open("ab")
        self._log.write(f"--- start {self.starts}\n".encode())
        self._log.flush()
        self._proc = proc = await asyncio.create_subprocess_exec(
            *_agenthub(), "serve", cwd=self.workdir, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        while time.monotonic() - began < _START_LIMIT_S:
            if proc.returncode is not None:
                raise SoakError(f"the hub exited with {proc.returncode} while starting\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return time.monotonic() - began
            await asyncio.sleep(0.05)
        raise SoakError(f"the hub did not listen on {HOST}:{self.port} within {_START_LIMIT_S:.0f} s")

    async def kill(self) -> int:
        """SIGKILL the hub, wait for it, and return its exit code (-9 unless it had died already)."""
        proc = self._require()
        self._account(proc)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        return await self._reap(proc)

    async def stop(self) -> int | None:
        """Stop the hub with SIGTERM; return its exit code, or None if it had to be killed."""
        proc = self._require()
        self._account(proc)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_LIMIT_S)
        except TimeoutError:
            proc.kill()
            await self._reap(proc)
            return None
        return await self._reap(proc)

    def alive(self) -> bool:
        """Whether the hub process is still running."""
        return self._proc is not None and self._proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines the hub wrote."""
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _account(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(proc.pid).cpu_times()
            self.cpu_s += times.user + times.system
        self.lived_s += time.monotonic() - self._spawned_at

    async def _reap(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def _require(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise SoakError("the hub was never started")
        return self._proc


# --- the store check ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One agent's state when the hub was dead: nothing it acks can change any more."""

    agent_id: str
    produced: int
    acked: frozenset[int]
    acked_seq: int  # the session's acked prefix, which it has deleted from its spool


@dataclass
class StoreCheck:
    """What the database held, and every way it broke a promise."""

    rows: int = 0
    acked: int = 0
    twice: int = 0  # rows beyond the first for an (agent, seq)
    acked_lost: int = 0  # acked events the store does not hold
    missing: int = 0  # produced events the store does not hold (counted in the final check only)
    integrity: str = ""
    problems: list[str] = field(default_factory=list)


def check_store(db_path: Path, snapshots: list[Snapshot], *, final: bool) -> StoreCheck:
    """Read the database (read-only) and check it against what the agents produced and were acked.

    `final`: the agents have emptied their spools, so the store must hold exactly what
    they produced, with the content they produced.
    """
    # mode=ro: no checkpoint, no write to the database or its WAL; the hub's next start finds
    # them as the kill left them
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    check = StoreCheck()
    try:
        verdict = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        check.integrity = "; ".join(verdict[:_SAMPLE])
        if verdict != ["ok"]:
            check.problems.append(f"integrity_check: {check.integrity}")
        column = "body" if final else "NULL"
        for snap in snapshots:
            rows = conn.execute(
                f"SELECT seq, {column} FROM events WHERE agent_id = ? ORDER BY seq",  # noqa: S608 - a column name from code
                (snap.agent_id,),
            ).fetchall()
            check_agent(rows, snap, check, final=final)
        if final and (pending := conn.execute("SELECT count(*) FROM scoring_pending").fetchone()[0]):
            check.problems.append(f"{pending} stored batches were never scored")
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if total != check.rows:
            check.problems.append(f"{total - check.rows} stored events belong to no soak agent")
    finally:
        conn.close()
    return check


def check_agent(
    rows: Sequence[tuple[int, bytes | None]], snap: Snapshot, check: StoreCheck, *, final: bool
) -> None:
    """Check one agent's stored (seq, body) rows against its snapshot; add to `check`.

    `final` needs the bodies (the content is compared); otherwise they may be None.
    """
    stored = {seq for seq, _ in rows}
    check.rows += len(rows)
    check.acked += len(snap.acked)
    name = snap.agent_id
    if len(stored) != len(rows):
        check.twice += len(rows) - len(stored)
        check.problems.append(f"{name}: {len(rows) - len(stored)} events stored more than once")
    if acked_lost := snap.acked - stored:
        check.acked_lost += len(acked_lost)
        check.problems.append(
            f"{name}: {len(acked_lost)} acked events are not stored, seqs {_sample(acked_lost)}"
        )
    if dropped := set(range(1, snap.acked_seq + 1)) - stored:
        check.problems.append(
            f"{name}: {len(dropped)} events at or below the acked prefix {snap.acked_seq} (gone from the "
            f"spool) are not stored, seqs {_sample(dropped)}"
        )
    if extra := {seq for seq in stored if not 1 <= seq <= snap.produced}:
        check.problems.append(f"{name}: {len(extra)} stored seqs were never produced: {_sample(extra)}")
    if not final:
        return
    if missing := set(range(1, snap.produced + 1)) - stored:
        check.missing += len(missing)
        check.problems.append(f"{name}: {len(missing)} produced events never stored, seqs {_sample(missing)}")
    wrong = [seq for seq, body in rows if msgpack.unpackb(body).get("path") != soak_path(name, seq)]
    if wrong:
        check.problems.append(
            f"{name}: {len(wrong)} stored events differ from what was produced: {wrong[:5]}"
        )


def _sample(seqs: Collection[int]) -> str:
    ordered = sorted(seqs)
    return ", ".join(map(str, ordered[:_SAMPLE])) + (" ..." if len(ordered) > _SAMPLE else "")


# --- the run --------------------------------------------------------------------------------


@dataclass
class Report:
    """The run's outcome and figures."""

    config: Config
    workdir: Path
    kills: int = 0
    checks: int = 0
    produced: int = 0
    stored: int = 0
    lost: int = 0  # produced, never stored
    twice: int = 0  # stored more than once
    acked: int = 0
    acked_lost: int = 0  # acked, then not found in the store (at any check)
    duplicates: int = 0  # resends the hub acked as already stored
    elapsed_s: float = 0.0
    setup_s: float = 0.0
    integrity_failures: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check held."""
        return not self.problems and self.kills == self.config.kills

    def summary(self) -> str:
        """Return the one PASS/FAIL line."""
        verdict = "PASS" if self.passed else "FAIL"
        settings = "".join(f", HUB_{name}={value}" for name, value in self.config.hub_settings)
        return (
            f"{verdict} kill9: {self.kills} kills, {self.config.agents} agents, {self.produced:,} events "
            f"produced, {self.stored:,} stored, {self.lost:,} lost, {self.twice:,} stored twice, "
            f"{self.acked:,} acked, {self.acked_lost:,} acked but not stored, {self.duplicates:,} resends "
            f"deduped, integrity ok in {self.checks - self.integrity_failures}/{self.checks} checks, "
            f"{self.elapsed_s:.1f} s (seed {self.config.seed}{settings})"
        )


class Agents:
    """The soak's agents: sessions, their tallies and their tasks."""

    def __init__(
        self, count: int, rate: float, workdir: Path, url: str, rng: random.Random,
        tally: Callable[[str], Tally] = Tally,
    ) -> None:  # fmt: skip
        certs = workdir / "certs"
        (workdir / "spools").mkdir(exist_ok=True)
        self.rate = rate  # events/s each agent produces
        self.stop_sources = asyncio.Event()
        self.sessions = [
            RecordingSession(
                tally(agent_id),
                url,
                certs / f"{agent_id}.pem",
                certs / f"{agent_id}.key",
                certs / "ca.pem",
                workdir / "spools" / f"{agent_id}.db",
                # a hub that is back within a second should find its agents back soon after
                reconnection_delay=0.25,
                reconnection_delay_max=2.0,
                randomization_factor=0.5,
            )
            for agent_id in agent_ids(count)
        ]
        self._offsets = [rng.uniform(0, _TICK_S) for _ in self.sessions]  # spread the bursts
        self.tasks: list[asyncio.Task[None]] = []
        self._acks_seen = [0] * len(self.sessions)

    def start(self) -> None:
        """Start every session with its source."""
        self.tasks = [
            asyncio.create_task(self._run(s, o)) for s, o in zip(self.sessions, self._offsets, strict=True)
        ]

    async def _run(self, session: RecordingSession, offset: float) -> None:
        _AGENT.set(session.tally.agent_id)  # this task and every task it starts log as this agent
        await asyncio.sleep(offset)
        await session.run(paced_events(session.tally, self.rate, self.stop_sources))

    def snapshots(self) -> list[Snapshot]:
        """Copy what every agent produced and was acked, now."""
        return [
            Snapshot(s.tally.agent_id, s.tally.produced, frozenset(s.tally.acked), s.acked_seq)
            for s in self.sessions
        ]

    def streaming_since_last_call(self) -> int:
        """Return how many agents got an ack since the previous call."""
        counts = [s.tally.acks for s in self.sessions]
        streaming = sum(now > before for now, before in zip(counts, self._acks_seen, strict=True))
        self._acks_seen = counts
        return streaming

    async def drain(self, limit: float) -> list[str]:
        """Stop the sources and wait up to `limit` s for every spool to empty; name the agents left."""
        self.stop_sources.set()
        waits = [asyncio.create_task(s.wait_drained()) for s in self.sessions]
        _, pending = await asyncio.wait(waits, timeout=limit)
        for task in pending:
            task.cancel()
        return [
            f"{s.tally.agent_id}: {s.spool.depth()} events still spooled after {limit:.0f} s"
            for s, task in zip(self.sessions, waits, strict=True)
            if task in pending
        ]

    async def stop(self) -> list[str]:
        """Stop every session; describe those that failed."""
        self.stop_sources.set()
        await asyncio.gather(*(s.stop() for s in self.sessions))
        outcomes = await asyncio.gather(*self.tasks, return_exceptions=True)
        return [
            f"{s.tally.agent_id}: the session failed: {outcome!r}"
            for s, outcome in zip(self.sessions, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]


def agent_ids(count: int) -> list[str]:
    """Return the soak agents' ids."""
    return [f"soak-{index:02d}" for index in range(1, count + 1)]


class _LoopLag:
    """While the agents stream: how late the event loop wakes up, and the CPU this process uses."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._began = (time.monotonic(), time.process_time())
        self._ended: tuple[float, float] | None = None

    def start(self) -> None:
        self._began = (time.monotonic(), time.process_time())
        self._task = asyncio.create_task(self._probe())

    async def stop(self) -> None:
        if self._ended is None:
            self._ended = (time.monotonic(), time.process_time())
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def elapsed_s(self) -> float:
        return (self._ended or (time.monotonic(), 0.0))[0] - self._began[0]

    async def _probe(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(_LAG_PROBE_S)
            self.samples.append(time.monotonic() - before - _LAG_PROBE_S)

    def describe(self) -> str:
        ordered = sorted(self.samples) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        wall, cpu = self._ended or (time.monotonic(), time.process_time())
        share = (cpu - self._began[1]) / max(wall - self._began[0], 1e-9) * 100
        worst = ordered[-1]
        return (
            f"event-loop lag p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms; CPU {share:.0f}% of one core"
        )


async def soak(config: Config, out: Callable[[str], None] = print) -> Report:
    """Run the kill -9 soak and return its report (see the module docstring)."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="kill9-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out(
        f"kill9: seed {config.seed}, {config.agents} agents at {config.rate:g} events/s each, "
        f"{config.kills} kills after {config.min_up_s:g}-{config.max_up_s:g} s up; folder {workdir}"
        + "".join(f"; HUB_{name}={value}" for name, value in config.hub_settings)
    )
    began = time.monotonic()
    port = free_port()
    env = hub_env(workdir, port, config.hub_settings)
    await make_pki(workdir, agent_ids(config.agents), env)
    run = _Soak(
        config, Report(config, workdir, setup_s=time.monotonic() - began), HubProcess(workdir, port, env), out
    )
    with agent_logs(workdir / "agents.log"):
        await run.run()
    run.report.elapsed_s = time.monotonic() - began
    if run.report.passed and not config.keep and config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.report


class _Soak:
    """One run: kills and checks while the agents stream, then the drain and the final check."""

    def __init__(self, config: Config, report: Report, hub: HubProcess, out: Callable[[str], None]) -> None:
        self.config = config
        self.report = report
        self.hub = hub
        self.out = out
        self.rng = random.Random(config.seed)
        self.db_path = report.workdir / "data" / "hub.db"
        self.agents = Agents(
            config.agents, config.rate, report.workdir, f"https://{HOST}:{hub.port}", self.rng
        )
        self.lag = _LoopLag()
        self._seen: set[str] = set()

    async def run(self) -> None:
        await self.hub.start()
        self.lag.start()
        self.agents.start()
        try:
            for number in range(1, self.config.kills + 1):
                await self._kill(number)
            await asyncio.sleep(self.config.tail_s)
            await self.lag.stop()  # the sources stop here
            self.report.problems += await self.agents.drain(self.config.drain_limit_s)
        finally:
            self.report.problems += await self.agents.stop()
            await self.lag.stop()
            if self.hub.alive() and await self.hub.stop() is None:
                self.report.problems.append(f"the hub did not stop on SIGTERM within {_STOP_LIMIT_S:.0f} s")
        await self._final_check()

    async def _kill(self, number: int) -> None:
        up = self.rng.uniform(self.config.min_up_s, self.config.max_up_s)
        await asyncio.sleep(up)
        if not self.hub.alive():
            self.report.problems.append(
                f"the hub died on its own before kill {number}\n{self.hub.log_tail()}"
            )
        code = await self.hub.kill()
        self.report.kills = number
        if code != -signal.SIGKILL:
            self.report.problems.append(f"the hub exited with {code} at kill {number}\n{self.hub.log_tail()}")
        # The hub is dead: no ack can be sent any more, so every acked event must be on disk now.
        check = await asyncio.to_thread(check_store, self.db_path, self.agents.snapshots(), final=False)
        self._note(check, f"after kill {number}")
        streaming = self.agents.streaming_since_last_call()
        self.out(
            f"kill {number:2d}/{self.config.kills} after {up:5.2f} s up: {check.rows:,} stored, "
            f"{check.acked:,} acked, {check.rows - check.acked:,} stored unacked, "
            f"{streaming}/{self.config.agents} agents acked since the last kill, integrity {check.integrity}"
            + (f"; PROBLEMS: {check.problems[:3]}" if check.problems else "")
        )
        startup = await self.hub.start()
        self.out(f"        hub listening again {startup:.2f} s after the restart")

    async def _final_check(self) -> None:
        report, sessions = self.report, self.agents.sessions
        final = await asyncio.to_thread(check_store, self.db_path, self.agents.snapshots(), final=True)
        self._note(final, "at the end")
        for session in sessions:
            tally = session.tally
            if tally.rejected:
                report.problems.append(f"{tally.agent_id}: the hub rejected {tally.rejected} events")
            if session.acked_seq != tally.produced:
                report.problems.append(
                    f"{tally.agent_id}: acked through {session.acked_seq} of {tally.produced}"
                )
        report.produced = sum(s.tally.produced for s in sessions)
        report.stored = final.rows
        report.lost = final.missing
        report.acked = final.acked
        report.duplicates = sum(s.tally.duplicates for s in sessions)
        offered = self.config.rate * self.config.agents
        achieved = report.produced / max(self.lag.elapsed_s, 1e-9)
        hub_cpu = self.hub.cpu_s / max(self.hub.lived_s, 1e-9) * 100
        self.out(
            f"final: {final.rows:,} stored of {report.produced:,} produced, integrity {final.integrity}; "
            f"load generator: {achieved:,.0f} of {offered:,.0f} events/s offered, "
            f"{self.lag.describe()}; hub CPU {hub_cpu:.0f}% of one core while it ran; "
            f"certificates made in {report.setup_s:.1f} s"
        )

    def _note(self, check: StoreCheck, when: str) -> None:
        self.report.checks += 1
        self.report.integrity_failures += check.integrity != "ok"
        self.report.acked_lost = max(self.report.acked_lost, check.acked_lost)
        self.report.twice = max(self.report.twice, check.twice)
        for problem in check.problems:
            # A loss stays visible at every later check; name it once, when first seen.
            subject, _, detail = problem.partition(": ")
            kind = f"{subject}: {re.sub(r'[0-9]+', '#', detail)}"
            if kind not in self._seen:
                self._seen.add(kind)
                self.report.problems.append(f"{when}: {problem}")


_AGENT: ContextVar[str] = ContextVar("soak_agent", default="-")


def _tag_agent(record: logging.LogRecord) -> bool:
    record.agent = _AGENT.get()
    return True


@contextlib.contextmanager
def agent_logs(path: Path) -> Iterator[None]:
    """Send the agents' logs (a reconnect story per kill) to a file instead of the terminal."""
    logger = logging.getLogger("agent_client")
    handler = logging.FileHandler(path)
    handler.addFilter(_tag_agent)
    handler.setFormatter(logging.Formatter("%(asctime)s %(agent)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.level, logger.propagate = saved


def main(argv: list[str] | None = None) -> None:
    """Run the soak from the command line; exit 1 on FAIL."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability.kill9", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="events/s per agent")
    parser.add_argument("--min-up", type=float, default=defaults.min_up_s, help="shortest hub life (s)")
    parser.add_argument("--max-up", type=float, default=defaults.max_up_s, help="longest hub life (s)")
    add_run_options(
        parser, repeats="kill moments", folder="certificates, data, spools and logs", keep="folder"
    )
    args = parser.parse_args(argv)
    config = Config(
        agents=args.agents, kills=args.kills, rate=args.rate, min_up_s=args.min_up, max_up_s=args.max_up,
        workdir=args.workdir, keep=args.keep, hub_settings=tuple(map(parse_setting, args.hub_setting)),
        **({"seed": args.seed} if args.seed is not None else {}),
    )  # fmt: skip
    run_and_report("kill9", soak(config), kept="hub.log, agents.log, data/, spools/")


def add_run_options(parser: argparse.ArgumentParser, *, repeats: str, folder: str, keep: str) -> None:
    """Add the options every reliability script takes: --seed, --workdir, --keep, --hub-setting."""
    parser.add_argument("--seed", type=int, help=f"repeat a run's {repeats} (random when left out)")
    parser.add_argument("--workdir", type=Path, help=f"folder for {folder}")
    parser.add_argument("--keep", action="store_true", help=f"keep the {keep} after a pass")
    parser.add_argument(
        "--hub-setting", action="append", default=[], metavar="NAME=VALUE",
        help="pass HUB_NAME=VALUE to the hub, e.g. MAX_BATCHES_IN_FLIGHT=1 (repeatable)",
    )  # fmt: skip


def run_and_report(script: str, run: Coroutine[Any, Any, Any], *, kept: str) -> NoReturn:
    """Run a reliability script's coroutine, print its problems and PASS/FAIL line, exit 0 or 1."""
    try:
        report = asyncio.run(run)
    except SoakError as exc:
        print(f"FAIL {script}: {exc}", flush=True)
        sys.exit(1)
    for problem in report.problems[:_SHOWN_PROBLEMS]:
        print(f"  problem: {problem}")
    if len(report.problems) > _SHOWN_PROBLEMS:
        print(f"  ... and {len(report.problems) - _SHOWN_PROBLEMS} more problems")
    if not report.passed:
        print(f"  files kept in {report.workdir} ({kept})")
    print(report.summary(), flush=True)
    sys.exit(0 if report.passed else 1)


def parse_setting(text: str) -> tuple[str, str]:
    """Parse a `--hub-setting NAME=VALUE` into (NAME without HUB_, VALUE)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--hub-setting takes NAME=VALUE, not {text!r}")
    return name.removeprefix("HUB_"), value


if __name__ == "__main__":
    main()
