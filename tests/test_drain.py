"""SIGTERM while agents stream: the hub takes nothing new, acks what it took, sends its agents away.

The hub runs as its own process (`agenthub serve`, TLS, SQLite); the agents are stock
python-socketio clients with client certificates that record every ack they receive. After
the hub exits, the database is read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import socketio

from hub.app import NAMESPACE_KEY, SHUTDOWN_GRACE_S
from hub.config import Settings
from hub.keys import PRESENCE
from tests.agent_client.conftest import until
from tests.conftest import ConnectAgent, RunningHub, client_ssl, free_port, try_connect

HOST = "127.0.0.1"
DRAIN_TIMEOUT_S = 10.0
RECONNECT_WINDOW_S = 2.0
# Agents' batches, then aiohttp's wait for the HTTP requests left (twice at worst), then the
# store's close: what systemd's TimeoutStopSec must cover (tests/test_systemd.py).
STOP_BOUND_S = DRAIN_TIMEOUT_S + 2 * SHUTDOWN_GRACE_S + 5
BATCH = 50


class StockAgent:
    """A stock python-socketio client holding an agent certificate; it streams and tallies acks."""

    def __init__(self, agent_id: str, url: str, certs: Path, *, reconnection: bool) -> None:
        self.agent_id = agent_id
        self.url = url
        context = client_ssl(certs / "ca.pem", certs / f"{agent_id}.pem", certs / f"{agent_id}.key")
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        # Quick reconnects, so a test does not wait long for the next hub.
        self.sio = socketio.AsyncClient(
            http_session=self.http, reconnection=reconnection, reconnection_delay=0.2,
            reconnection_delay_max=1.0, randomization_factor=0.1,
        )  # fmt: skip
        self.up = asyncio.Event()
        self.connections = 0
        self.seen: list[str] = []  # "ack", "refused", "hint", "disconnect", in arrival order
        self.hints: list[Any] = []
        self.disconnects: list[str] = []
        self.acked: set[int] = set()
        self.refusals: list[str] = []  # error codes of answered batches
        self.refused: set[int] = set()  # seqs of batches answered with an error
        self.pending: deque[list[dict[str, Any]]] = deque()  # batches to send again
        self.produced = 0
        self.sio.on("connect", self._on_connect, namespace="/agent")
        self.sio.on("disconnect", self._on_disconnect, namespace="/agent")
        self.sio.on("reconnect", self._on_hint, namespace="/agent")

    async def _on_connect(self) -> None:
        self.connections += 1
        self.up.set()

    async def _on_disconnect(self, reason: str = "") -> None:
        self.up.clear()
        self.disconnects.append(reason)
        self.seen.append("disconnect")

    async def _on_hint(self, data: Any) -> None:
        self.hints.append(data)
        self.seen.append("hint")

    async def connect(self) -> None:
        await self.sio.connect(self.url, namespaces=["/agent"], transports=["websocket"], wait_timeout=10)

    def batch(self, count: int = BATCH) -> list[dict[str, Any]]:
        """Produce the next `count` events."""
        first = self.produced + 1
        self.produced += count
        return [
            {"seq": seq, "ts": 1_700_000_000.0 + seq, "kind": "file_open", "pid": 7,
             "path": f"/drain/{self.agent_id}/{seq}"}
            for seq in range(first, first + count)
        ]  # fmt: skip

    async def send(self, events: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Send a batch; return its answer (None when the socket failed first, and it is kept)."""
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_answer(ack: dict[str, Any]) -> None:
            # Tallied as the packet is read: in the wire's order against hints, and before the
            # test looks, whenever the hub answered before it exited.
            self._tally(events, ack)
            if not answer.done():  # not given up on (timed out)
                answer.set_result(ack)

        try:
            await self.sio.emit("events", {"events": events}, namespace="/agent", callback=on_answer)
            async with asyncio.timeout(5):
                return await answer
        except (socketio.exceptions.SocketIOError, TimeoutError):  # cut off before the answer
            self.pending.append(events)
            return None

    def _tally(self, events: list[dict[str, Any]], ack: dict[str, Any]) -> None:
        assert isinstance(ack, dict), ack
        if "error" in ack:
            self.seen.append("refused")
            self.refusals.append(ack["error"]["code"])
            self.refused.update(event["seq"] for event in events)
            self.pending.append(events)
        else:
            self.seen.append("ack")
            assert not ack["rejected"], ack
            self.acked.update(event["seq"] for event in events)

    async def stream(self, stop: asyncio.Event) -> None:
        """Send batches back to back until `stop`, then until nothing is left to send again."""
        while not stop.is_set() or self.pending:
            await self.up.wait()
            ack = await self.send(self.pending.popleft() if self.pending else self.batch())
            if ack is None or "error" in ack:  # kept for later; no busy loop meanwhile
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.sio.reconnection = False
        with contextlib.suppress(Exception):
            await self.sio.disconnect()
        await self.http.close()


def _env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    # A developer's own HUB_* settings must not leak into the run.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HUB_")}
    env.update(
        HUB_HOST=HOST,
        HUB_PORT=str(port),
        HUB_DATA_DIR=str(settings.data_dir),
        HUB_CERTS_DIR=str(settings.certs_dir),
        HUB_JWT_SECRET="test-secret-" + "d" * 40,
        HUB_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        HUB_DRAIN_RECONNECT_WINDOW_S=str(RECONNECT_WINDOW_S),
        HUB_LOG_FORMAT="text",
        **extra,
    )
    return env


async def _serve(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """Start `agenthub serve` in its own process; return once it listens."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub.cli", "serve", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=out,
        )  # fmt: skip
    for _ in range(600):
        if proc.returncode is not None:
            raise AssertionError(f"the hub exited with {proc.returncode}:\n{_tail(log)}")
        if await _accepts(int(env["HUB_PORT"])):
            return proc
        await asyncio.sleep(0.05)
    proc.kill()
    await proc.wait()
    raise AssertionError(f"the hub did not listen:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _stopped(proc: asyncio.subprocess.Process, log: Path) -> None:
    """Wait for the hub to exit after SIGTERM: 0, within the bound systemd's stop allows."""
    try:
        async with asyncio.timeout(STOP_BOUND_S):
            code = await proc.wait()
    except TimeoutError:
        raise AssertionError(f"no exit within {STOP_BOUND_S} s of SIGTERM:\n{_tail(log)}") from None
    assert code == 0, _tail(log)


def _stored(db: Path) -> dict[str, list[int]]:
    """Every stored (agent, seq), read from the database itself, duplicates kept."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT agent_id, seq FROM events ORDER BY agent_id, seq").fetchall()
    finally:
        conn.close()
    stored: dict[str, list[int]] = {}
    for agent_id, seq in rows:
        stored.setdefault(agent_id, []).append(seq)
    return stored


def _check_acked_are_stored_once(db: Path, agents: list[StockAgent]) -> dict[str, list[int]]:
    stored = _stored(db)
    for agent in agents:
        seqs = stored.get(agent.agent_id, [])
        assert len(seqs) == len(set(seqs)), f"{agent.agent_id}: an event is stored twice"
        lost = agent.acked - set(seqs)
        assert not lost, f"{agent.agent_id}: {len(lost)} acked events are not stored, e.g. {sorted(lost)[:5]}"
    return stored


async def _pending_events(metrics_port: int) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{HOST}:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("hub_ingest_pending")
    )


async def test_sigterm_refuses_connects_and_acks_the_batch_under_way(
    settings: Settings, tmp_path: Path
) -> None:
    """The listener closes at once; the batch being committed is acked; a later one is refused; exit 0."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "hub.log"
    # Another process holding SQLite's write lock keeps the first batch committing as long as the test wants.
    env = _env(settings, port, HUB_SQLITE_BUSY_TIMEOUT_S="60", HUB_METRICS_LISTEN=f"{HOST}:{metrics_port}")
    hub = await _serve(env, log)
    agent = StockAgent("agent-1", f"https://{HOST}:{port}", settings.certs_dir, reconnection=False)
    lock = sqlite3.connect(settings.db_path, isolation_level=None)
    try:
        await agent.connect()
        lock.execute("BEGIN IMMEDIATE")
        first = asyncio.create_task(agent.send(agent.batch(100)))
        for _ in range(200):  # until the hub has the batch (waiting for the lock)
            if await _pending_events(metrics_port) == 100:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the batch never reached the hub")

        hub.send_signal(signal.SIGTERM)
        for _ in range(200):  # the listener closes as soon as the hub handles the signal
            if not await _accepts(port):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the hub still accepts connections after SIGTERM")
        assert hub.returncode is None, "the hub exited with a batch under way"
        assert not first.done()
        late = await agent.send(agent.batch(50))  # on the open socket, during the drain
        assert late is not None
        assert late["error"]["code"] == "unavailable", late

        lock.execute("ROLLBACK")  # the commit goes through now
        assert await asyncio.wait_for(first, 30) == {"accepted": 100, "duplicates": 0, "rejected": [],
                                                     "last_seq": 100}  # fmt: skip
        await _stopped(hub, log)
    finally:
        lock.close()
        await agent.close()
        if hub.returncode is None:
            hub.kill()
            await hub.wait()
    # The ack came first, then the hint, then the transport closed: no Socket.IO DISCONNECT,
    # so a stock client's own reconnection takes over.
    assert agent.seen == ["refused", "ack", "hint", "disconnect"]
    assert agent.disconnects == [socketio.AsyncClient.reason.TRANSPORT_ERROR]
    [hint] = agent.hints
    assert hint["reason"] == "draining"
    assert 0 <= hint["after_ms"] <= RECONNECT_WINDOW_S * 1000
    assert _stored(settings.db_path) == {"agent-1": list(range(1, 101))}


async def test_sigterm_during_a_stream_stores_every_acked_event_once(
    settings: Settings, tmp_path: Path
) -> None:
    """Three agents stream; SIGTERM; every acked event is stored once; they reconnect to the next hub."""
    port = free_port()
    env = _env(settings, port)
    logs = [tmp_path / "hub-1.log", tmp_path / "hub-2.log"]
    hub = await _serve(env, logs[0])
    agents = [
        StockAgent(agent_id, f"https://{HOST}:{port}", settings.certs_dir, reconnection=True)
        for agent_id in ("agent-1", "agent-2", "agent-3")
    ]
    stop = asyncio.Event()
    senders: list[asyncio.Task[None]] = []
    try:
        for agent in agents:
            await agent.connect()
        # three batches in flight per agent, back to back: SIGTERM mostly finds some under way
        # (the test above makes sure of one)
        senders = [asyncio.create_task(agent.stream(stop)) for agent in agents for _ in range(3)]
        await until(lambda: all(len(agent.acked) >= 100 * BATCH for agent in agents), 60)

        hub.send_signal(signal.SIGTERM)
        await _stopped(hub, logs[0])
        # The hub is gone: no ack can come any more, so everything acked must be stored.
        acked_by_first = {agent.agent_id: set(agent.acked) for agent in agents}
        stored = _check_acked_are_stored_once(settings.db_path, agents)
        for agent in agents:
            # nothing half-acked: a batch the hub answered with an error is not stored
            assert not (agent.refused - agent.acked) & set(stored[agent.agent_id])
            assert agent.hints, f"{agent.agent_id} was not told to reconnect"
            assert agent.hints[-1]["reason"] == "draining"
            assert 0 <= agent.hints[-1]["after_ms"] <= RECONNECT_WINDOW_S * 1000

        # Stock clients ignore the hint and reconnect by themselves: here to the next hub on the
        # same port and database (behind nginx, to a remaining node).
        hub = await _serve(env, logs[1])
        await until(lambda: all(agent.connections >= 2 for agent in agents), 30)
        await until(lambda: all(agent.acked > acked_by_first[agent.agent_id] for agent in agents), 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*senders), 60)
        for agent in agents:
            await agent.close()
        hub.send_signal(signal.SIGTERM)
        await _stopped(hub, logs[1])
    finally:
        stop.set()
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for agent in agents:
            await agent.close()
        if hub.returncode is None:
            hub.kill()
            await hub.wait()

    stored = _check_acked_are_stored_once(settings.db_path, agents)
    for agent in agents:  # everything sent again was taken in the end: exactly what was produced
        assert stored[agent.agent_id] == list(range(1, agent.produced + 1))
        # unavailable: sent during the drain; overloaded: over the agent's quota of events/s
        assert set(agent.refusals) <= {"unavailable", "overloaded"}, agent.refusals


async def test_drain_sends_every_agent_away_and_refuses_newcomers(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    """In process, listener still open: each agent gets its hint; a late connect is refused."""
    hints: dict[str, list[Any]] = {"agent-1": [], "agent-2": []}
    agents = [
        await connect_agent(agent_id, handlers={"reconnect": _collect(received)})
        for agent_id, received in hints.items()
    ]
    await hub.app[NAMESPACE_KEY].drain()
    for agent, received in zip(agents, hints.values(), strict=True):
        await until(lambda agent=agent: not agent.sio.connected)
        [hint] = received
        assert hint["reason"] == "draining"
        assert 0 <= hint["after_ms"] <= hub.settings.drain_reconnect_window_s * 1000
    assert hub.app[PRESENCE].sid_of("agent-1") is None
    assert "server_shutdown" in str(await hub.store.get_agent("agent-1"))
    # A connection the listener took just before it closed is refused, with a code that is retried.
    refusal = await try_connect(hub, hub.certs / "agent-3.pem", hub.certs / "agent-3.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "unavailable"


def _collect(into: list[Any]) -> Callable[[Any], Awaitable[None]]:
    async def handler(data: Any) -> None:
        into.append(data)

    return handler
