"""Ingest benchmark: the matrix of agents, batch sizes and encodings, the hub beside two baselines.

Each cell of the matrix (10, 100 and 1,000 agents; batches of 1 and 100; JSON and msgpack)
runs three targets in turn: a bare python-socketio server that only counts and acks, the
hub over sockets, and, for JSON, the hub's own HMAC-signed HTTP ingest (one request per
batch, keep-alive; the design of HTTP-only platforms), with the hub's rate limits lifted
for it. Every server runs as its own process pinned to core 0; this load generator pins
itself to core 1. Every agent holds its own mTLS connection and keeps one batch in flight
(send, await the ack, repeat). Every batch carries one event that matches a detection
rule for a fresh process, so each batch produces one score push; 10 dashboard WebSockets
on the hub measure emit-to-push latency from it. The agents speak Socket.IO at the wire
(`WireSocket`): python-socketio's client would cost the load generator's core as much as
the bare server's work costs its own.

The clock starts once every agent and dashboard is connected: a second of warm-up, then
the measured window, in which every answer received counts. The CPU both processes use in
that window is part of each row: the load generator is not the bottleneck while its share
stays well below its core's, and events per second of the server's CPU compare the
servers even when other work shares their core.

The 100-agent, batch-100 JSON cell is the reference: the summary keys come from it, and
it gets one more hub row paced at half the hub's peak, where latency is read.

    python -m bench.ingest [--agents 10 100 1000] [--batches 1 100] [--encodings json msgpack]
                           [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import platform
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil

from bench.harness import (
    SECRET,
    add_before_argument,
    free_port,
    hub_command,
    hub_env,
    percentile,
    pin_load_generator,
    record_results,
    start_server,
    stop_server,
    table,
)
from hub.certs import init_pki, issue_agent
from hub.config import Settings
from hub.tokens import create_token

HEADERS = [
    "target",
    "encoding",
    "load",
    "agents",
    "batch",
    "events_per_s",
    "rejected",
    "ack_p50_ms",
    "ack_p99_ms",
    "push_p50_ms",
    "push_p99_ms",
    "server_cpu_pct",
    "events_per_cpu_s",
    "loadgen_cpu_pct",
]
DASHBOARDS = 10
WARMUP_S = 1.0
# At most this many TLS handshakes at once: 1,000 at once would time out on one core.
CONNECTING = 100
CONNECT_TIMEOUT_S = 120


@dataclass(frozen=True)
class Cell:
    agents: int
    batch: int
    encoding: str


REFERENCE = Cell(agents=100, batch=100, encoding="json")


@dataclass
class Result:
    target: str
    cell: Cell
    rate: float | None = None  # offered events/s when paced; None = as fast as acks return
    events_per_s: float = 0.0
    refused: Counter[str] = field(default_factory=Counter)  # why batches were refused in the window
    server_cpu_pct: float | None = None
    loadgen_cpu_pct: float | None = None
    ack_ms: list[float] = field(default_factory=list, repr=False)
    push_ms: list[float] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "agents": self.cell.agents,
            "batch": self.cell.batch,
            "encoding": self.cell.encoding,
            "load": f"paced {round(self.rate)}/s" if self.rate else "saturated",
            "events_per_s": round(self.events_per_s),
            "rejected": sum(self.refused.values()),
            "ack_p50_ms": percentile(self.ack_ms, 50),
            "ack_p99_ms": percentile(self.ack_ms, 99),
            "push_p50_ms": percentile(self.push_ms, 50),
            "push_p99_ms": percentile(self.push_ms, 99),
            "server_cpu_pct": self.server_cpu_pct,
            # Events per second of the server's own CPU: what other work on its core does not skew.
            "events_per_cpu_s": round(self.events_per_s * 100 / self.server_cpu_pct)
            if self.server_cpu_pct
            else None,
            "loadgen_cpu_pct": self.loadgen_cpu_pct,
        }


@dataclass
class Run:
    """One target under load: its clients wait for everyone to connect, then share one window."""

    url: str
    certs: Path
    result: Result
    seconds: float
    dashboards: int
    go: asyncio.Event = field(default_factory=asyncio.Event)
    connecting: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTING))
    ready: int = 0
    measure_from: float = 0.0
    stop_at: float = 0.0
    accepted: int = 0
    # (agent, pid of the batch's rule hit) -> wall-clock time it was emitted
    emitted: dict[tuple[str, int], float] = field(default_factory=dict)

    async def started(self) -> None:
        """Count this client as connected and wait for the window to be set."""
        self.ready += 1
        await self.go.wait()

    def open(self) -> None:
        self.measure_from = time.monotonic() + WARMUP_S
        self.stop_at = self.measure_from + self.seconds
        self.go.set()

    def emit(self, agent_id: str, events: list[dict[str, Any]]) -> None:
        if self.dashboards:  # nobody reads them otherwise
            self.emitted[(agent_id, events[-1]["pid"])] = time.time()

    def acked(self, sent: float, done: float, answer: int | str) -> None:
        """Count a batch answered in the window: the events it accepted, or why it was refused."""
        if not self.measure_from <= done <= self.stop_at:
            return
        if isinstance(answer, str):
            self.result.refused[answer] += 1
            return
        self.accepted += answer
        self.result.ack_ms.append((done - sent) * 1000)

    def pace(self, index: int) -> tuple[float, float]:
        """(seconds between an agent's batches, its first send) at the offered rate; 0 = saturated."""
        rate, cell = self.result.rate, self.result.cell
        if not rate:
            return 0.0, 0.0
        interval = cell.agents * cell.batch / rate
        return interval, time.monotonic() + interval * index / cell.agents  # spread the agents out


class Batches:
    """One agent's batches, built once and renumbered in place: the load generator's core is
    better spent sending them than building 100 dicts a batch."""

    def __init__(self, agent: int, size: int, hits: int = 1) -> None:
        """`size` events a batch, the last `hits` of them rule hits, each in a fresh process."""
        self._pid = 100_000 + agent * 10_000_000
        self._hits = hits
        self._events: list[dict[str, Any]] = [
            {
                "seq": 0,
                "ts": 0.0,
                "kind": "file_open",
                "pid": 2000 + i % 50,
                "path": f"/var/lib/app/{i}.dat",
                "uid": 1000,
            }
            for i in range(size - hits)
        ]
        # A MEDIUM rule hit (SSH key read by a fresh process): one score push each, no alert.
        hit = {
            "seq": 0,
            "ts": 0.0,
            "kind": "file_open",
            "pid": 0,
            "path": "/home/app/.ssh/id_ed25519",
            "exe": "/usr/bin/python3",
        }
        self._events += [dict(hit) for _ in range(hits)]

    def next(self, seq: int) -> list[dict[str, Any]]:
        """The next batch, its events numbered from `seq`, its rule hits in fresh processes."""
        now = time.time()
        for i, event in enumerate(self._events, seq):
            event["seq"] = i
            event["ts"] = now
        for event in self._events[len(self._events) - self._hits :]:
            self._pid += 1
            event["pid"] = self._pid
        return self._events


class WireSocket:
    """An agent's Socket.IO connection (Engine.IO 4 over a WebSocket), spoken at the wire.

    python-socketio's client costs the load generator about as much per batch as the bare
    server's work on it, so with one core each the generator, not the server, would set the
    pace. This speaks the same packets with one frame out and one in per batch.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = 0

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str) -> tuple[WireSocket, dict[str, Any]]:
        """Open the `/agent` namespace; return the socket and the server's hello."""
        socket = cls(await session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket"))
        await socket._receive()  # Engine.IO OPEN
        await socket._ws.send_str("40/agent,")
        while True:
            text = await socket._receive()
            if text.startswith("4/agent,"):  # CONNECT_ERROR
                raise ConnectionError(f"connection refused: {text}")
            if text.startswith('2/agent,["hello",'):
                return socket, orjson.loads(text[len("2/agent,") :])[1]

    async def call(self, payload: dict[str, Any] | bytes, event: str = "events") -> dict[str, Any]:
        """Emit `event` with `payload` (bytes go as a binary attachment); return the ack."""
        self._ids += 1  # Frames out: "4" (Engine.IO MESSAGE), then the Socket.IO packet.
        if isinstance(payload, bytes):
            await self._ws.send_str(f'451-/agent,{self._ids}["{event}",{{"_placeholder":true,"num":0}}]')
            await self._ws.send_bytes(payload)
        else:
            await self._ws.send_str(f"42/agent,{self._ids}" + orjson.dumps([event, payload]).decode())
        ack = f"3/agent,{self._ids}"
        while True:
            text = await self._receive()
            if text.startswith(ack) and text[len(ack)] == "[":
                answer: dict[str, Any] = orjson.loads(text[len(ack) :])[0]
                return answer

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await self._ws.send_str("41/agent,")
        await self._ws.close()

    async def _receive(self) -> str:
        """The next Socket.IO packet (without its Engine.IO MESSAGE prefix), answering pings on the way."""
        while True:
            message = await self._ws.receive(timeout=60)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"the server closed the socket: {message.type!r}")
            text: str = message.data
            if text == "2":  # Engine.IO PING
                await self._ws.send_str("3")
            elif text.startswith("0"):  # Engine.IO OPEN
                return text
            elif text.startswith("41/agent,"):  # Socket.IO DISCONNECT: no ack will come
                raise ConnectionError("the hub ended the agent's session")
            elif text.startswith("4"):
                return text[1:]


def _client_context(certs: Path, agent_id: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if agent_id is not None:
        context.load_cert_chain(certs / f"{agent_id}.pem", certs / f"{agent_id}.key")
    return context


async def _agent(run: Run, index: int) -> None:
    agent_id = f"bench-{index}"
    cell = run.result.cell
    batches = Batches(index, cell.batch)
    connector = aiohttp.TCPConnector(ssl=_client_context(run.certs, agent_id))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with run.connecting:
            socket, hello = await WireSocket.connect(session, run.url)
        try:
            await run.started()
            seq = hello.get("last_seq", 0) + 1
            interval, next_send = run.pace(index)
            while time.monotonic() < run.stop_at:
                if interval:
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                    next_send += interval
                events = batches.next(seq)
                payload = (
                    msgpack.packb({"events": events}) if cell.encoding == "msgpack" else {"events": events}
                )
                sent = time.monotonic()
                run.emit(agent_id, events)
                ack = await socket.call(payload)
                done = time.monotonic()
                if "error" in ack:
                    run.acked(sent, done, ack["error"].get("code", "error"))
                    await asyncio.sleep(ack["error"].get("retry_after_ms", 100) / 1000)
                    continue
                seq += len(events)
                run.acked(sent, done, ack["accepted"])
        finally:
            await socket.close()


async def _post(
    session: aiohttp.ClientSession, agent_id: str, secret: str, events: list[dict[str, Any]]
) -> int | str:
    """POST one signed batch; return how many events it accepted, or why it was refused."""
    body = orjson.dumps({"events": events})
    stamp = str(int(time.time()))
    signature = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).hexdigest()
    headers = {
        "X-Agent-ID": agent_id,
        "X-Agent-Timestamp": stamp,
        "X-Agent-Signature": signature,
        "Content-Type": "application/json",
    }
    async with session.post("/api/v1/events", data=body, headers=headers) as response:
        ack = await response.json(content_type=None)
        return int(ack["accepted"]) if response.status == 200 else f"{response.status} {ack.get('code')}"


async def _http_agent(run: Run, index: int, secret: str) -> None:
    agent_id = f"bench-{index}"
    batches = Batches(index, run.result.cell.batch)
    seq = 1
    connector = aiohttp.TCPConnector(ssl=_client_context(run.certs))
    async with aiohttp.ClientSession(base_url=run.url, connector=connector) as session:
        # A first batch before the clock starts: the connection is open, as a socket agent's is.
        async with run.connecting:
            first = await _post(session, agent_id, secret, batches.next(seq))
        seq += first if isinstance(first, int) else 0
        await run.started()
        while time.monotonic() < run.stop_at:
            events = batches.next(seq)
            sent = time.monotonic()
            run.emit(agent_id, events)
            accepted = await _post(session, agent_id, secret, events)
            done = time.monotonic()
            run.acked(sent, done, accepted)
            if isinstance(accepted, str):
                await asyncio.sleep(0.1)
                continue
            seq += len(events)


async def _signing_secrets(url: str, certs: Path, token: str, agents: int) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(ssl=_client_context(certs))
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def one(i: int) -> str:
            async with session.post(f"/api/v1/agents/bench-{i}/signing-secret", headers=headers) as response:
                secret: str = (await response.json())["secret"]
                return secret

        return list(await asyncio.gather(*(one(i) for i in range(agents))))


async def _dashboard(run: Run, token: str) -> None:
    connector = aiohttp.TCPConnector(ssl=_client_context(run.certs))
    async with aiohttp.ClientSession(connector=connector) as session:
        # Batched frames, as the pages take them: each frame an array of what was pending.
        headers = {"Authorization": f"Bearer {token}"}
        ws = await session.ws_connect(f"{run.url}/ws/live?batch=1", headers=headers)
        await run.started()
        with contextlib.suppress(asyncio.TimeoutError):
            while time.monotonic() < run.stop_at:
                message = await ws.receive(timeout=max(0.1, run.stop_at - time.monotonic()))
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                if time.monotonic() < run.measure_from:
                    continue
                for data in orjson.loads(message.data):
                    if data["type"] != "score":
                        continue
                    sent = run.emitted.get((data["data"]["agent_id"], data["data"]["pid"]))
                    if sent is not None:
                        run.result.push_ms.append((time.time() - sent) * 1000)
        await ws.close()


def _busy_s(process: psutil.Process, *, children: bool) -> float:
    """CPU seconds (user + system) of `process`, and of its children if asked, so far."""
    total = 0.0
    for each in (process, *(process.children(recursive=True) if children else ())):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = each.cpu_times()
            total += times.user + times.system
    return total


async def _cpu_shares(run: Run, server: psutil.Process) -> None:
    """Record the server's and this load generator's CPU use over the measured window, in %."""
    me = psutil.Process()  # its children are the servers: not counted
    await asyncio.sleep(max(0.0, run.measure_from - time.monotonic()))
    before = _busy_s(server, children=True), _busy_s(me, children=False)
    await asyncio.sleep(max(0.0, run.stop_at - time.monotonic()))
    after = _busy_s(server, children=True), _busy_s(me, children=False)
    run.result.server_cpu_pct = round(100 * (after[0] - before[0]) / run.seconds)
    run.result.loadgen_cpu_pct = round(100 * (after[1] - before[1]) / run.seconds)


async def _drive(run: Run, token: str | None, server: psutil.Process) -> None:
    agents = run.result.cell.agents
    clients: list[Coroutine[Any, Any, None]]
    if run.result.target == "http":
        secrets = await _signing_secrets(run.url, run.certs, token or "", agents)
        clients = [_http_agent(run, i, secrets[i]) for i in range(agents)]
    else:
        clients = [_agent(run, i) for i in range(agents)]
    if token:
        clients += [_dashboard(run, token) for _ in range(run.dashboards)]
    tasks = [asyncio.create_task(client) for client in clients]
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while run.ready < len(tasks):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {run.ready} of {len(tasks)} clients connected in {CONNECT_TIMEOUT_S} s")
        for task in tasks:
            if task.done():
                task.result()  # a client that could not connect: its error ends the run
        await asyncio.sleep(0.05)
    run.open()
    await asyncio.gather(*tasks, _cpu_shares(run, server))
    run.result.events_per_s = run.accepted / run.seconds


def _run_target(
    target: str,
    cell: Cell,
    seconds: float,
    certs: Path,
    workdir: Path,
    rate: float | None = None,
    *,
    source: Path | None = None,
) -> Result:
    """Run one target; `source`: the tree whose `hub` package the hub runs (this one by default)."""
    load = f"paced at {round(rate)} events/s" if rate else "saturated"
    what = f"{target} ({cell.encoding}, {cell.agents} agents, batches of {cell.batch}), {load}"
    print(f"running {what} for {seconds:g} s...", file=sys.stderr, flush=True)
    port = free_port()
    data_dir = workdir / f"data-{target}-{cell.agents}-{cell.batch}-{cell.encoding}-{rate or 'peak'}"
    if target == "bare":
        command = [sys.executable, "-m", "bench.bare_server", "--port", str(port), "--certs-dir", str(certs)]
        token = None
    else:
        command = hub_command(port)
        token = create_token(
            Settings(data_dir=workdir, jwt_secret=SECRET), scopes=["hub:admin"], subject="bench"
        )
    proc = start_server(command, hub_env(data_dir, certs), port, cwd=source)
    result = Result(target, cell, rate)
    run = Run(f"https://127.0.0.1:{port}", certs, result, seconds, DASHBOARDS if token else 0)
    try:
        asyncio.run(_drive(run, token, psutil.Process(proc.pid)))
    finally:
        stop_server(proc)
    if result.refused:
        print(f"  refused: {dict(result.refused)}", file=sys.stderr)
    return result


def _run_cell(
    cell: Cell, seconds: float, certs: Path, workdir: Path, before: Path | None
) -> dict[str, Result]:
    """The targets of one cell, saturated: the HTTP ingest takes JSON only."""
    targets = ("bare", "hub", "http") if cell.encoding == "json" else ("bare", "hub")
    results = {target: _run_target(target, cell, seconds, certs, workdir) for target in targets}
    if before is not None:  # the same hub socket load against an earlier version's hub
        results["hub@before"] = _run_target("hub@before", cell, seconds, certs, workdir, source=before)
    return results


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ingest benchmark: the hub beside a bare python-socketio server and its HTTP ingest."
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 100, 1000], help="agent counts")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100], help="events per batch")
    parser.add_argument("--encodings", nargs="+", choices=["json", "msgpack"], default=["json", "msgpack"])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the reference cell only (100 agents, JSON batches of 100), 3 s a row",
    )
    add_before_argument(parser)  # in every cell
    args = parser.parse_args()
    if args.quick:
        args.agents, args.batches, args.encodings, args.seconds = [100], [100], ["json"], 3.0
    return args


def main() -> None:
    args = _arguments()
    cells = [Cell(a, b, e) for e in args.encodings for b in args.batches for a in args.agents]
    reference = REFERENCE if REFERENCE in cells else cells[0]
    pin_load_generator()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as tmp:
        workdir = Path(tmp)
        certs = workdir / "certs"
        init_pki(certs, ["127.0.0.1", "localhost"])
        for i in range(max(args.agents)):
            issue_agent(certs, f"bench-{i}")
        peaks = {cell: _run_cell(cell, args.seconds, certs, workdir, args.before) for cell in cells}
        # Latency means something at a load the hub sustains: half its peak.
        half = round(peaks[reference]["hub"].events_per_s / 2)
        paced = _run_target("hub", reference, args.seconds, certs, workdir, rate=half)
    rows = [result.row() for peak in peaks.values() for result in peak.values()] + [paced.row()]
    print(table(rows, HEADERS))
    print(f"{len(rows)} rows in {time.monotonic() - started:.0f} s", file=sys.stderr)
    record_results(_summary(args, rows, peaks, reference, paced))


def _summary(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    peaks: dict[Cell, dict[str, Result]],
    reference: Cell,
    paced: Result,
) -> dict[str, Any]:
    """The figures of latest.json: the reference cell's, its ratios, and every row."""
    summary: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["python -m bench.ingest", *sys.argv[1:]]),
        "ingest_reference": {
            "agents": reference.agents,
            "batch": reference.batch,
            "encoding": reference.encoding,
        },
        "rows": rows,
        # Below its core's 100%, the load generator kept up in every row.
        "loadgen_cpu_pct_max": max((row["loadgen_cpu_pct"] or 0 for row in rows), default=0),
    }
    for encoding in args.encodings:
        cell = Cell(reference.agents, reference.batch, encoding)
        if cell in peaks:
            ratio = peaks[cell]["hub"].events_per_s / max(1.0, peaks[cell]["bare"].events_per_s)
            print(f"hub/bare ({encoding}, {cell.agents} agents, batches of {cell.batch}): {ratio:.2f}")
            summary[f"ratio_{encoding}"] = round(ratio, 3)
    peak = peaks[reference]
    summary.update(
        ingest_events_per_s=round(peak["hub"].events_per_s),
        bare_events_per_s=round(peak["bare"].events_per_s),
        ack_p99_ms=percentile(paced.ack_ms, 99),
        push_p99_ms=percentile(paced.push_ms, 99),
        saturated_ack_p99_ms=percentile(peak["hub"].ack_ms, 99),
    )
    if "http" in peak:
        socket_over_http = peak["hub"].events_per_s / max(1.0, peak["http"].events_per_s)
        print(f"hub socket/HTTP per batch: {socket_over_http:.2f}")
        summary.update(
            http_events_per_s=round(peak["http"].events_per_s), ratio_socket_http=round(socket_over_http, 3)
        )
    return summary


if __name__ == "__main__":
    main()
