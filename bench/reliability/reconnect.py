"""A soak of agents reconnecting continuously: the hub's RSS and open files must level off.

The hub runs as its own process (`agenthub serve`, TLS, SQLite, a throwaway folder, as in
`kill9.py`), pinned to core 0. Load-generator processes (this module with `--worker`, pinned
to core 1) hold `--agents` stock python-socketio clients over mTLS (WebSocket transport), each
with its own certificate, issued in-process with `hub.certs`. Every agent cycles for the whole
run: connect, wait for `hello`, send a small batch (acked) and a heartbeat (acked), stay
connected for a random while, disconnect, stay away briefly, connect again. The hold times
are drawn so that the hub sees `--churn-per-s` reconnects a second once the fleet is up.

Every `--sample-s` seconds the hub's RSS and open file descriptors (psutil) are read beside
the number of agents connected. After the run the agents leave, the hub's files are read once
more, the hub stops (SIGTERM) and its database is read: the agents table must hold one row
per agent and the events table exactly the events acked.

PASS when: the hub never died and stopped cleanly; no agent saw an error; over the second half
of the run the hub's RSS grew by at most `--max-rss-mib-per-min` (least-squares slope; the
default 1 MiB/min is about 350 bytes a session at 50 reconnects/s, so one leaked object a
session shows) and its descriptors beyond the connected agents by at most `--max-fd-per-min`;
once every agent has left, the hub holds at most `--fd-slack` descriptors more than before any
came; and the store holds every agent and exactly the acked events.

Why memory grows, when it does: `--probe` makes the hub (through a `sitecustomize` the soak
writes) count its objects by type at every sample, and once every agent has left, run a full
`gc.collect()` and count again: garbage waiting for a collection is told apart from objects
still referenced. `--trace` adds tracemalloc's growing allocation sites; `--collect-s S` has
the hub collect fully every S seconds, to see whether RSS then levels off.

    python -m bench.reliability.reconnect [--agents 1000] [--minutes 10] [--churn-per-s 50]
                                          [--generators 2] [--sample-s 5] [--seed N]
                                          [--probe] [--trace] [--collect-s S] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import shutil
import signal
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil
import socketio

from bench.harness import free_port, percentile, pin_load_generator
from bench.reliability.kill9 import HOST, HubProcess, SoakError, add_run_options, hub_env, parse_setting
from hub.certs import init_pki, issue_agent

NAMESPACE = "/agent"
_ROOT = Path(__file__).resolve().parents[2]  # where `bench` is importable from
_CALL_TIMEOUT_S = 30.0  # a connect, hello or ack slower than this counts as an error
_GAP_MAX_S = 1.0  # an agent stays away up to this long between sessions
_REPORT_S = 1.0  # a generator tells its counters this often
_LAG_PROBE_S = 0.05
_SETTLE_S = 3.0  # after the agents left: the hub closes their sockets and writes their presence
_STOP_LIMIT_S = 30.0
_BATCH = 5  # events per session


@dataclass(frozen=True)
class Config:
    """One run's shape; the defaults are `make soak-reconnect`'s."""

    agents: int = 1000
    minutes: float = 10.0
    churn_per_s: float = 50.0  # reconnects a second the hub sees once the fleet is up
    generators: int = 2  # load-generator processes
    ramp_s: float = 10.0  # the first connects are spread over this long
    warmup_s: float | None = None  # a quarter of the run, at most 60 s, when None
    sample_s: float = 5.0
    max_rss_mib_per_min: float = 1.0  # RSS growth allowed over the second half
    max_fd_per_min: float = 5.0  # growth of descriptors beyond the connected agents, second half
    fd_slack: int = 8  # descriptors the hub may hold beyond its start once every agent left
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**32))
    workdir: Path | None = None  # a fresh temporary folder when None
    keep: bool = False  # keep the folder after a pass (it is always kept after a failure)
    hub_settings: tuple[tuple[str, str], ...] = ()
    probe: bool = False  # the hub takes a census of its heap at every sample (slows it a little)
    trace: bool = False  # and traces allocations with tracemalloc (slows it a lot)
    collect_s: float | None = None  # with the probe: a full gc.collect() in the hub this often

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, self.duration_s / 4)


# --- the load generator (a process of its own) ----------------------------------------------


@dataclass
class WorkerJob:
    """What one load-generator process runs: agents `first`..`first + count - 1`."""

    url: str
    certs: str
    first: int
    count: int
    mean_hold_s: float
    ramp_s: float
    seed: int


@dataclass
class WorkerCounts:
    """A generator's counters, cumulative, as it reports them (one JSON line each)."""

    connected: int = 0  # agents with a session open now
    sessions: int = 0  # sessions that got their hello
    acked: int = 0  # events the hub acked as accepted
    heartbeats: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: dict[str, str] = field(default_factory=dict)  # one message per kind
    cpu_s: float = 0.0
    wall_s: float = 0.0
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    connect_p50_ms: float | None = None  # connect call to hello
    connect_p99_ms: float | None = None
    final: bool = False


class AgentError(Exception):
    """A session went wrong; `kind` names how, for the tally."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class _Agent:
    """One soak agent as its generator keeps it between sessions."""

    name: str
    context: ssl.SSLContext
    seq: int = 0  # the last event seq the hub acked


def agent_id(index: int) -> str:
    """Return the id of soak agent `index`."""
    return f"reconnect-{index:04d}"


class Generator:
    """One process's share of the fleet, each agent cycling through sessions until told to stop."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self.counts = WorkerCounts()
        self.errors: Counter[str] = Counter()
        self.stop = asyncio.Event()
        self.connect_ms: list[float] = []
        self.lags: list[float] = []
        self._began = (time.monotonic(), time.process_time())

    async def run(self) -> None:
        probe = asyncio.create_task(self._probe_lag())
        reporter = asyncio.create_task(self._report_forever())
        rng = random.Random(self.job.seed)
        indexes = range(self.job.first, self.job.first + self.job.count)
        agents = [asyncio.create_task(self._agent(i, random.Random(rng.random()))) for i in indexes]
        await self._wait_for_stop()
        _, pending = await asyncio.wait(agents, timeout=_STOP_LIMIT_S)
        for task in pending:
            self._error("stop_timeout", "the session did not end within the stop limit")
            task.cancel()
        probe.cancel()
        reporter.cancel()
        await asyncio.gather(*agents, probe, reporter, return_exceptions=True)
        self.counts.final = True
        self._report()

    async def _wait_for_stop(self) -> None:
        # The parent writes a line (or closes the pipe) to stop the fleet.
        await asyncio.to_thread(sys.stdin.readline)
        self.stop.set()

    async def _agent(self, index: int, rng: random.Random) -> None:
        certs = Path(self.job.certs)
        agent = _Agent(agent_id(index), ssl.create_default_context(cafile=str(certs / "ca.pem")))
        agent.context.load_cert_chain(certs / f"{agent.name}.pem", certs / f"{agent.name}.key")
        await self._pause(rng.uniform(0, self.job.ramp_s))
        # The first hold is drawn from the whole range too, so reconnects are spread from the start.
        while not self.stop.is_set():
            try:
                await self._session(agent, rng.uniform(0, 2 * self.job.mean_hold_s))
            except AgentError as error:
                self._error(error.kind, str(error))
            except Exception as exc:  # whatever else a session raised: counted, and the agent goes on
                self._error(type(exc).__name__, repr(exc))
            await self._pause(rng.uniform(0, _GAP_MAX_S))

    async def _session(self, agent: _Agent, hold_s: float) -> None:
        """Run one session: connect, hello, a batch, heartbeats while it holds, disconnect."""
        hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ours = False  # whether the disconnect is this side's
        lost: list[str] = []

        def on_hello(data: dict[str, Any]) -> None:
            if not hello.done():
                hello.set_result(data)

        def on_disconnect(reason: str = "") -> None:
            if not ours:
                lost.append(str(reason))

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=agent.context)) as http:
            client = socketio.AsyncClient(http_session=http, reconnection=False)
            client.on("hello", on_hello, namespace=NAMESPACE)
            client.on("disconnect", on_disconnect, namespace=NAMESPACE)
            began = time.monotonic()
            try:
                await client.connect(self.job.url, namespaces=[NAMESPACE], transports=["websocket"],
                                     wait_timeout=_CALL_TIMEOUT_S)  # fmt: skip
            except socketio.exceptions.ConnectionError as exc:
                raise AgentError("connect_failed", repr(exc)) from None
            self.counts.connected += 1
            try:
                interval = await self._converse(client, hello, agent, began)
                await self._hold(client, hold_s, interval, lost)
            finally:
                self.counts.connected -= 1
                ours = True
                await client.disconnect()

    async def _converse(
        self, client: socketio.AsyncClient, hello: asyncio.Future[dict[str, Any]], agent: _Agent, began: float
    ) -> float:
        """Wait for hello, send a batch and a heartbeat; return the heartbeat interval hello named."""
        try:
            greeting = await asyncio.wait_for(hello, _CALL_TIMEOUT_S)
        except TimeoutError:
            raise AgentError("hello_timeout", "no hello within the call timeout") from None
        self.connect_ms.append((time.monotonic() - began) * 1000)
        self.counts.sessions += 1
        last_seq = greeting.get("last_seq")
        if last_seq != agent.seq:  # the hub stored something it did not ack, or lost something it did
            agent.seq = max(agent.seq, int(last_seq or 0))  # one error, not one a session from now on
            raise AgentError("last_seq_mismatch", f"hello says last_seq {last_seq}, acked {agent.seq}")
        now = time.time()
        seqs = range(agent.seq + 1, agent.seq + 1 + _BATCH)
        batch = [{"seq": n, "ts": now, "kind": "file_open", "pid": 4000 + n % 8, "uid": 1000,
                  "path": f"/var/lib/soak/{n}"} for n in seqs]  # fmt: skip
        ack = await self._call(client, "events", {"events": batch})
        if ack.get("accepted") != _BATCH:
            raise AgentError("batch_refused", f"ack {ack!r}")
        agent.seq += _BATCH
        self.counts.acked += _BATCH
        await self._beat(client)
        return float(greeting.get("heartbeat_interval_s") or 10.0)

    async def _hold(
        self, client: socketio.AsyncClient, hold_s: float, interval: float, lost: list[str]
    ) -> None:
        """Stay connected for `hold_s`, heartbeating every `interval` as an agent does."""
        deadline = time.monotonic() + hold_s
        while (remaining := deadline - time.monotonic()) > 0 and not self.stop.is_set():
            await self._pause(min(interval, remaining))
            if lost:
                raise AgentError("dropped_by_hub", f"the hub closed the session: {lost[0]}")
            if deadline - time.monotonic() > 0 and not self.stop.is_set():
                await self._beat(client)

    async def _beat(self, client: socketio.AsyncClient) -> None:
        beat = {"ts": time.time(), "cpu_percent": 1.0, "mem_percent": 10.0, "disk_percent": 20.0,
                "spool_depth": 0, "dropped": 0, "uptime_s": 1.0}  # fmt: skip
        answer = await self._call(client, "heartbeat", beat)
        if "server_time" not in answer:
            raise AgentError("heartbeat_refused", f"ack {answer!r}")
        self.counts.heartbeats += 1

    @staticmethod
    async def _call(client: socketio.AsyncClient, event: str, data: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await client.call(event, data, namespace=NAMESPACE, timeout=_CALL_TIMEOUT_S)
        except socketio.exceptions.TimeoutError:
            raise AgentError(f"{event}_timeout", f"no ack to {event} within the call timeout") from None
        except socketio.exceptions.SocketIOError as exc:
            raise AgentError(f"{event}_failed", repr(exc)) from None
        return answer if isinstance(answer, dict) else {"unexpected": answer}

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def _error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.counts.error_sample.setdefault(kind, detail[:300])

    async def _probe_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(_LAG_PROBE_S)
            self.lags.append((time.monotonic() - before - _LAG_PROBE_S) * 1000)

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(_REPORT_S)
            self._report()

    def _report(self) -> None:
        counts = self.counts
        counts.errors = dict(self.errors)
        counts.wall_s = time.monotonic() - self._began[0]
        counts.cpu_s = time.process_time() - self._began[1]
        counts.lag_p99_ms = percentile(self.lags, 99) or 0.0
        counts.lag_max_ms = round(max(self.lags, default=0.0), 2)
        if counts.final:
            counts.connect_p50_ms = percentile(self.connect_ms, 50)
            counts.connect_p99_ms = percentile(self.connect_ms, 99)
        print(json.dumps(asdict(counts)), flush=True)


def worker_main(job_json: str) -> None:
    """Run one load-generator process (started by the soak with `--worker`)."""
    pin_load_generator()
    job = WorkerJob(**json.loads(job_json))
    run: Callable[[Any], None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # a cheaper loop: the generator must not be what limits the churn

        run = uvloop.run
    run(Generator(job).run())


# --- the heap probe (inside the hub, with --probe) -----------------------------------------

_PROBE_FILE = "RECONNECT_PROBE_FILE"  # where the hub appends its censuses; set only with --probe
_PROBE_TRACE = "RECONNECT_PROBE_TRACE"
_PROBE_FRAMES = 8
_PROBE_TYPES = 200  # most numerous types in a census
_probe_baseline: list[tracemalloc.Snapshot] = []


def install_probe() -> None:
    """In the hub (imported by a sitecustomize the soak writes): answer SIGUSR2 with a heap census.

    A census counts the objects the cyclic collector tracks, by type, and with `--trace` the
    allocation sites that grew since the first full collection. When `<file>.collect` exists it first
    runs a full `gc.collect()` and records what that freed: garbage waiting for a collection
    is told apart from objects still referenced.
    """
    out = Path(os.environ[_PROBE_FILE])
    if os.environ.get(_PROBE_TRACE):
        tracemalloc.start(_PROBE_FRAMES)
    # A Python-level handler runs in the main thread between bytecodes: the heap is consistent.
    signal.signal(signal.SIGUSR2, lambda _signum, _frame: _census(out))


def _census(out: Path) -> None:
    collect = out.with_suffix(".collect")
    freed, pause_ms = None, None
    if collect.exists():
        collect.unlink()
        began = time.perf_counter()
        freed = gc.collect()
        pause_ms = (time.perf_counter() - began) * 1000
    objects = gc.get_objects()
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    entry: dict[str, Any] = {
        "rss": psutil.Process().memory_info().rss, "collected": freed, "pause_ms": pause_ms,
        "frozen": gc.get_freeze_count(), "tracked": len(objects),
        "types": dict(types.most_common(_PROBE_TYPES)),
        "collections": [stats["collections"] for stats in gc.get_stats()],
        "exceptions": dict(Counter(map(_raised_where, filter(_is_exception, objects))).most_common(8)),
        "allocators": _allocators(),
    }  # fmt: skip
    del objects
    if tracemalloc.is_tracing() and freed is not None:  # after a full collection: live objects only
        snapshot = tracemalloc.take_snapshot()
        if not _probe_baseline:
            _probe_baseline.append(snapshot)
        growth = snapshot.compare_to(_probe_baseline[0], "traceback") if _probe_baseline else []
        entry["growth"] = [
            {"kib": stat.size_diff // 1024, "count": stat.count_diff, "where": stat.traceback.format()[-12:]}
            for stat in sorted(growth, key=lambda stat: stat.size_diff, reverse=True)[:10]
        ]
    with out.open("a") as file:
        file.write(json.dumps(entry) + "\n")


_MALLINFO2 = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def _allocators() -> dict[str, int]:
    """Bytes held by pymalloc and by C malloc: where RSS sits when the objects do not grow."""
    figures: dict[str, int] = {}
    # pymalloc tells only through sys._debugmallocstats, which writes to the C-level stderr.
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        for line in sink.read().decode().splitlines():
            name, _, value = line.partition("=")
            if name.strip() in ("# arenas allocated current", "# bytes in allocated blocks"):
                figures[name.strip("# ").strip()] = int(value.replace(",", ""))
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        figures |= {"malloc in use": info.uordblks + info.hblkhd, "malloc free": info.fordblks}
    return figures


def _is_exception(thing: object) -> bool:
    return isinstance(thing, BaseException)


def _raised_where(error: BaseException) -> str:
    """Name an exception by type and the innermost frame it went through (a traceback is a cycle's root)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else ""
    return f"{type(error).__qualname__}{where}"


class Probe:
    """The soak's side of the heap probe: the hub's environment, the signals, the censuses."""

    def __init__(self, workdir: Path, trace: bool, collect_s: float | None) -> None:
        self.file = workdir / "probe.jsonl"
        self.site = workdir / "probe"
        self.trace = trace
        self.collect_s = collect_s
        self._collected_at = time.monotonic()
        self.site.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(
            "from bench.reliability.reconnect import install_probe\n\ninstall_probe()\n"
        )
        self.file.unlink(missing_ok=True)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """Return the hub's environment with the probe installed."""
        path = os.pathsep.join(filter(None, [str(self.site), str(_ROOT), env.get("PYTHONPATH")]))
        return (
            env
            | {"PYTHONPATH": path, _PROBE_FILE: str(self.file)}
            | ({_PROBE_TRACE: "1"} if self.trace else {})
        )

    def census(self, process: psutil.Process, *, collect: bool = False) -> None:
        """Ask the hub for a census (after a full collection when `collect`, or when one is due)."""
        if collect or (self.collect_s and time.monotonic() - self._collected_at >= self.collect_s):
            self._collected_at = time.monotonic()
            self.file.with_suffix(".collect").touch()
        process.send_signal(signal.SIGUSR2)

    def describe(self, warm_index: int) -> list[str]:
        """Compare the census after the warm-up, the last one under load and the one after collecting."""
        censuses = (
            [json.loads(line) for line in self.file.read_text().splitlines()] if self.file.is_file() else []
        )
        if len(censuses) < 3:
            return ["probe: too few censuses"]
        warm, loaded, collected = censuses[min(warm_index, len(censuses) - 3)], censuses[-2], censuses[-1]
        lines = [
            f"probe: gc-tracked objects {warm['tracked']:,} after warm-up, {loaded['tracked']:,} at the end, "
            f"{collected['tracked']:,} after every agent left and a full gc.collect() (which freed "
            f"{collected['collected']:,}; RSS then {collected['rss'] / 2**20:.1f} MiB); collections per "
            f"generation {loaded['collections']}, {loaded['frozen']:,} objects frozen",
        ]
        grown = Counter(loaded["types"])
        grown.subtract(warm["types"])
        for name, _ in grown.most_common(12):
            counts = [census["types"].get(name, 0) for census in (warm, loaded, collected)]
            lines.append(
                f"probe:   {name}: {counts[0]:,} -> {counts[1]:,} -> {counts[2]:,} after gc.collect()"
            )
        lines += [f"probe:   {count:,} exceptions {where}" for where, count in loaded["exceptions"].items()]
        return lines + self._after_collections(censuses)

    @staticmethod
    def _after_collections(censuses: list[dict[str, Any]]) -> list[str]:
        """What was still referenced after each full collection: a true leak grows here."""
        swept = [census for census in censuses if census.get("pause_ms") is not None]
        pauses = [census["pause_ms"] for census in swept]
        lines = [
            f"probe: {len(swept)} full collections took {min(pauses):.0f}-{max(pauses):.0f} ms each; "
            f"objects left after each (thousands): {' '.join(str(c['tracked'] // 1000) for c in swept)}; "
            f"RSS then (MiB): {' '.join(str(c['rss'] >> 20) for c in swept)}"
        ]
        for name in swept[-1].get("allocators", {}):
            figures = [c.get("allocators", {}).get(name, 0) for c in swept]
            shown = " ".join(str(f) if name.startswith("arenas") else str(f >> 20) for f in figures)
            lines.append(f"probe:   {name}{'' if name.startswith('arenas') else ' (MiB)'}: {shown}")
        if len(swept) > 2:  # the first under load against the last under load (the final one is idle)
            grown = Counter(swept[-2]["types"])
            grown.subtract(swept[0]["types"])
            first, last = swept[0]["types"], swept[-2]["types"]
            lines += [f"probe:   {name}: {first.get(name, 0):,} -> {last[name]:,} after a full collection"
                      for name, more in grown.most_common(8) if more > 0]  # fmt: skip
        for stat in swept[-1].get("growth", []):
            # the frames' file:line lines only (format() puts each frame's source line after it)
            frames = " | ".join(line.strip() for line in stat["where"] if not line.startswith("    "))
            lines.append(f"probe:   +{stat['kib']:,} KiB in {stat['count']:+,} blocks at {frames}")
        return lines


# --- the soak (the parent process) ----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The hub seen at one moment of the run."""

    t: float  # seconds since the agents started
    rss: int
    fds: int
    connected: int
    sessions: int
    hub_cpu_s: float


@dataclass
class Report:
    """What a run found; `passed` is the verdict."""

    config: Config
    workdir: Path
    setup_s: float = 0.0
    start: Sample | None = None  # before any agent
    samples: list[Sample] = field(default_factory=list)
    after: Sample | None = None  # once every agent has left
    workers: list[WorkerCounts] = field(default_factory=list)
    agents_rows: int = 0
    events_rows: int = 0
    problems: list[str] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)  # what the heap probe found, with --probe

    @property
    def sessions(self) -> int:
        return sum(w.sessions for w in self.workers)

    @property
    def acked(self) -> int:
        return sum(w.acked for w in self.workers)

    @property
    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for worker in self.workers:
            total.update(worker.errors)
        return total

    @property
    def warm(self) -> Sample | None:
        return next((s for s in self.samples if s.t >= self.config.warmup), None)

    @property
    def second_half(self) -> list[Sample]:
        return [s for s in self.samples if s.t >= self.config.duration_s / 2]

    def rss_slope(self) -> float:
        """RSS growth over the second half, MiB a minute."""
        return _slope(self.second_half, lambda s: s.rss / 2**20)

    def fd_slope(self) -> float:
        """Growth of descriptors beyond the connected agents over the second half, a minute."""
        return _slope(self.second_half, lambda s: s.fds - s.connected)

    def verdicts(self) -> list[str]:
        """Every broken promise (empty when the run passed)."""
        config, failed = self.config, list(self.problems)
        if len(self.second_half) < 3:
            failed.append("too few samples in the second half to fit a slope")
        elif self.rss_slope() > config.max_rss_mib_per_min:
            failed.append(f"RSS grew {self.rss_slope():.2f} MiB/min over the second half "
                          f"(bound {config.max_rss_mib_per_min:g})")  # fmt: skip
        if len(self.second_half) >= 3 and self.fd_slope() > config.max_fd_per_min:
            failed.append(f"descriptors beyond the connected agents grew {self.fd_slope():.2f}/min "
                          f"over the second half (bound {config.max_fd_per_min:g})")  # fmt: skip
        if self.start is None or self.after is None:
            failed.append(
                "the hub's descriptors were not read both before the agents came and after they left"
            )
        elif self.after.fds > self.start.fds + config.fd_slack:
            failed.append(f"the hub holds {self.after.fds} descriptors after every agent left, "
                          f"{self.start.fds} before any came (slack {config.fd_slack})")  # fmt: skip
        if self.errors:
            failed.append(f"agents saw errors: {dict(self.errors)}")
        if self.agents_rows != config.agents:
            failed.append(f"the agents table holds {self.agents_rows} rows, not {config.agents}")
        if self.events_rows != self.acked:
            failed.append(f"the store holds {self.events_rows} events, {self.acked} were acked")
        return failed

    @property
    def passed(self) -> bool:
        return not self.verdicts()

    def describe(self) -> list[str]:
        """The figures, line by line, for the terminal."""
        lines = []
        for name, sample in (("start (no agent)", self.start), (f"after warm-up ({self.config.warmup:g} s)",
                             self.warm), ("end", self.samples[-1] if self.samples else None),
                             ("after every agent left", self.after)):  # fmt: skip
            if sample is not None:
                lines.append(f"  {name:<26} t={sample.t:6.0f} s  RSS {sample.rss / 2**20:7.1f} MiB  "
                             f"FDs {sample.fds:5d}  connected {sample.connected:5d}")  # fmt: skip
        lines += [f"  {line}" for line in self._series()]
        half = self.second_half
        if len(half) >= 2:
            grown, sessions = half[-1].rss - half[0].rss, half[-1].sessions - half[0].sessions
            lines.append(f"  second half ({half[0].t:.0f}-{half[-1].t:.0f} s): RSS {grown / 2**20:+.1f} MiB "
                         f"over {sessions:,} sessions ({grown / max(sessions, 1) / 1024:+.1f} KiB each), "
                         f"FDs {half[0].fds} -> {half[-1].fds}")  # fmt: skip
        elapsed = self.samples[-1].t - self.samples[0].t if len(self.samples) > 1 else 0.0
        hub_cpu = (self.samples[-1].hub_cpu_s - self.samples[0].hub_cpu_s) / elapsed * 100 if elapsed else 0.0
        lines.append(f"  hub CPU {hub_cpu:.0f}% of one core over the run; store: {self.agents_rows} agents, "
                     f"{self.events_rows:,} events stored, {self.acked:,} acked")  # fmt: skip
        for number, worker in enumerate(self.workers, 1):
            lines.append(
                f"  generator {number}: CPU {worker.cpu_s / max(worker.wall_s, 1e-9) * 100:.0f}% of core 1, "
                f"loop lag p99 {worker.lag_p99_ms:.0f} ms (max {worker.lag_max_ms:.0f}), connect to hello "
                f"p50 {worker.connect_p50_ms} ms p99 {worker.connect_p99_ms} ms, {worker.sessions:,} sessions"
            )
        for worker in self.workers:
            lines += [f"  error {kind}: {message}" for kind, message in worker.error_sample.items()]
        return lines + [f"  {line}" for line in self.probe]

    def _series(self) -> list[str]:
        """RSS and FDs a minute apart (about), so growth or a plateau shows at a glance."""
        step = max(1, round(60 / self.config.sample_s))
        shown = self.samples[::step]
        if self.samples and shown[-1] is not self.samples[-1]:
            shown.append(self.samples[-1])
        rss = " ".join(f"{s.rss / 2**20:.0f}" for s in shown)
        fds = " ".join(f"{s.fds - s.connected}" for s in shown)
        return [f"RSS MiB every ~{step * self.config.sample_s:g} s: {rss}",
                f"FDs beyond connected agents, same moments: {fds}"]  # fmt: skip

    def summary(self) -> str:
        """The pass/fail line."""
        elapsed = self.samples[-1].t if self.samples else 0.0
        verdict = "PASS" if self.passed else "FAIL"
        head = (
            f"{verdict} reconnect: {self.config.agents} agents, {self.sessions:,} sessions "
            f"({self.sessions / max(elapsed, 1e-9):.1f}/s over {elapsed:.0f} s, target "
            f"{self.config.churn_per_s:g}/s), {sum(self.errors.values())} errors"
        )
        if len(self.second_half) < 3:
            return head
        config, before, after = self.config, self.start, self.after
        return (
            f"{head}; second half: RSS {self.rss_slope():+.2f} MiB/min "
            f"(bound {config.max_rss_mib_per_min:g}), "
            f"FDs beyond connected {self.fd_slope():+.2f}/min (bound {config.max_fd_per_min:g}); "
            f"FDs {before.fds if before else '?'} before, {after.fds if after else '?'} after; "
            f"store {self.agents_rows} agents, {self.events_rows:,}/{self.acked:,} events stored/acked "
            f"(seed {self.config.seed})"
        )


def _slope(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    """Least-squares slope of `value` against time, per minute."""
    if len(samples) < 2:
        return 0.0
    fit = statistics.linear_regression([s.t / 60 for s in samples], [value(s) for s in samples])
    return fit.slope


def make_certificates(certs: Path, count: int) -> None:
    """Create the CA, the server certificate and each agent's, unless the folder has them already."""
    init_pki(certs, [HOST])
    for index in range(1, count + 1):
        if not (certs / f"{agent_id(index)}.pem").is_file():
            issue_agent(certs, agent_id(index))


class Fleet:
    """The load-generator processes and what each last reported."""

    def __init__(self, config: Config, url: str, certs: Path, logs: Path) -> None:
        share, extra = divmod(config.agents, config.generators)
        # A cycle is a hold, a gap and a few round trips: holds this long give `churn_per_s`.
        mean_hold_s = max(config.agents / config.churn_per_s - _GAP_MAX_S / 2, 0.0)
        self.jobs, first = [], 1
        for number in range(config.generators):
            count = share + (number < extra)
            self.jobs.append(WorkerJob(url, str(certs), first, count,
                                       mean_hold_s=mean_hold_s,
                                       ramp_s=config.ramp_s, seed=config.seed + number))  # fmt: skip
            first += count
        self.latest = [WorkerCounts() for _ in self.jobs]
        self.logs = logs
        self._procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self._log_files: list[IO[bytes]] = []

    async def start(self) -> None:
        for number, job in enumerate(self.jobs):
            log = (self.logs / f"generator-{number + 1}.log").open("wb")
            self._log_files.append(log)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.reliability.reconnect", "--worker", json.dumps(asdict(job)),
                cwd=_ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
            self._procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(number, proc)))

    @property
    def connected(self) -> int:
        return sum(w.connected for w in self.latest)

    @property
    def sessions(self) -> int:
        return sum(w.sessions for w in self.latest)

    async def _read(self, number: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError, TypeError):
                self.latest[number] = WorkerCounts(**json.loads(line))

    async def stop(self) -> list[str]:
        """Tell every generator to end its sessions; wait for their final counts; name failures."""
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
        problems = []
        for number, proc in enumerate(self._procs):
            try:
                code = await asyncio.wait_for(proc.wait(), _STOP_LIMIT_S * 2)
            except TimeoutError:
                proc.kill()
                code = await proc.wait()
            if code or not self.latest[number].final:
                problems.append(f"generator {number + 1} exited with {code} (see generator-{number + 1}.log)")
        await asyncio.gather(*self._readers, return_exceptions=True)
        for log in self._log_files:
            log.close()
        return problems


async def soak(config: Config, out: Callable[[str], None] = print) -> Report:
    """Run the reconnect soak and return its report (see the module docstring)."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="reconnect-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out(f"reconnect: seed {config.seed}, {config.agents} agents over {config.generators} generators, "
        f"{config.churn_per_s:g} reconnects/s for {config.minutes:g} min; folder {workdir}")  # fmt: skip
    began = time.monotonic()
    # A reused folder keeps its certificates only: the hub starts on an empty store.
    shutil.rmtree(workdir / "data", ignore_errors=True)
    await asyncio.to_thread(make_certificates, workdir / "certs", config.agents)
    report = Report(config, workdir, setup_s=time.monotonic() - began)
    out(f"certificates ready in {report.setup_s:.1f} s")
    port = free_port()
    env = hub_env(workdir, port, config.hub_settings)
    probe = Probe(workdir, config.trace, config.collect_s) if config.probe or config.trace else None
    hub = HubProcess(workdir, port, probe.env(env) if probe else env)
    await hub.start()
    try:
        await _run(config, report, hub, probe, out)
    finally:
        if hub.alive() and await hub.stop() != 0:
            report.problems.append(f"the hub did not stop cleanly on SIGTERM\n{hub.log_tail()}")
    _check_store(workdir / "data" / "hub.db", report)
    if report.passed and not config.keep and config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


async def _run(
    config: Config, report: Report, hub: HubProcess, probe: Probe | None, out: Callable[[str], None]
) -> None:
    process = _hub_process()
    _pin(process)
    await asyncio.sleep(_SETTLE_S)
    report.start = _sample(process, 0.0, 0, 0)
    fleet = Fleet(config, f"https://{HOST}:{hub.port}", report.workdir / "certs", report.workdir)
    began = time.monotonic()
    await fleet.start()
    try:
        while (elapsed := time.monotonic() - began) < config.duration_s:
            await asyncio.sleep(min(config.sample_s, config.duration_s - elapsed))
            if not hub.alive():
                report.problems.append(f"the hub died {elapsed:.0f} s into the run\n{hub.log_tail()}")
                return
            sample = _sample(process, time.monotonic() - began, fleet.connected, fleet.sessions)
            report.samples.append(sample)
            if probe:
                probe.census(process)
            out(f"t={sample.t:5.0f} s  RSS {sample.rss / 2**20:6.1f} MiB  FDs {sample.fds:5d}  "
                f"connected {sample.connected:5d}  sessions {sample.sessions:7,d}")  # fmt: skip
    finally:
        report.problems += await fleet.stop()
        report.workers = fleet.latest
    await asyncio.sleep(_SETTLE_S)
    if not hub.alive():
        return
    report.after = _sample(process, time.monotonic() - began, 0, fleet.sessions)
    if probe:
        probe.census(process, collect=True)
        await asyncio.sleep(_SETTLE_S)
        warm = report.warm
        report.probe = probe.describe(report.samples.index(warm) if warm else 0)


def _hub_process() -> psutil.Process:
    # The hub is this process's one child at this point (`agenthub serve`; the generators come later).
    children = psutil.Process().children()
    if len(children) != 1:
        raise SoakError(f"expected the hub as the only child process, found {len(children)}")
    return children[0]


def _pin(process: psutil.Process) -> None:
    """Keep every thread of the hub on core 0 (the generators are on core 1), where there are two."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return
    # Affinity is a thread's: the hub's threads started already (the store's) each need it set.
    for thread in process.threads():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread.id, {0})


def _sample(process: psutil.Process, t: float, connected: int, sessions: int) -> Sample:
    times = process.cpu_times()
    return Sample(
        t, process.memory_info().rss, process.num_fds(), connected, sessions, times.user + times.system
    )


def _check_store(db_path: Path, report: Report) -> None:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        report.agents_rows = conn.execute("SELECT count(*) FROM agents").fetchone()[0]
        report.events_rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    """Run the soak from the command line; exit 1 on FAIL."""
    if argv is None and sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2])
        return
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability.reconnect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--churn-per-s", type=float, default=defaults.churn_per_s, help="reconnects a second")
    parser.add_argument(
        "--generators", type=int, default=defaults.generators, help="load-generator processes"
    )
    parser.add_argument("--ramp-s", type=float, default=defaults.ramp_s, help="spread the first connects (s)")
    parser.add_argument("--warmup-s", type=float, help="warm-up before the figures count (s)")
    parser.add_argument("--sample-s", type=float, default=defaults.sample_s, help="sampling interval (s)")
    parser.add_argument("--max-rss-mib-per-min", type=float, default=defaults.max_rss_mib_per_min)
    parser.add_argument("--max-fd-per-min", type=float, default=defaults.max_fd_per_min)
    parser.add_argument("--fd-slack", type=int, default=defaults.fd_slack)
    add_run_options(
        parser, repeats="hold times", folder="certificates (reused), data and logs", keep="folder"
    )
    parser.add_argument("--probe", action="store_true", help="census the hub's heap by type at every sample")
    parser.add_argument("--trace", action="store_true", help="--probe with tracemalloc (much slower hub)")
    parser.add_argument(
        "--collect-s", type=float, help="with --probe: a full gc.collect() in the hub this often"
    )
    args = parser.parse_args(argv)
    config = Config(
        agents=args.agents, minutes=args.minutes, churn_per_s=args.churn_per_s, generators=args.generators,
        ramp_s=args.ramp_s, warmup_s=args.warmup_s, sample_s=args.sample_s,
        max_rss_mib_per_min=args.max_rss_mib_per_min, max_fd_per_min=args.max_fd_per_min,
        fd_slack=args.fd_slack, workdir=args.workdir, keep=args.keep, probe=args.probe, trace=args.trace,
        collect_s=args.collect_s,
        hub_settings=tuple(map(parse_setting, args.hub_setting)),
        **({"seed": args.seed} if args.seed is not None else {}),
    )  # fmt: skip
    try:
        report = asyncio.run(soak(config))
    except SoakError as exc:
        print(f"FAIL reconnect: {exc}", flush=True)
        sys.exit(1)
    for line in report.describe():
        print(line)
    for problem in report.verdicts():
        print(f"  problem: {problem}")
    if not report.passed:
        print(f"  files kept in {report.workdir} (hub.log, generator-*.log, data/)")
    print(report.summary(), flush=True)
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
