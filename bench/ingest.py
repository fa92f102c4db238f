"""Ingest benchmark: N agents over real mTLS sockets, the hub beside two baselines.

Baselines in the same run: a bare python-socketio server that only counts and acks, and
the hub's own HMAC-signed HTTP ingest (one request per batch, keep-alive; the design of
HTTP-only platforms), with the hub's rate limits lifted for it. Every server runs as its
own process pinned to core 0; this load generator pins itself to core 1. Each agent keeps
one batch in flight (send, await the ack, repeat). Every batch carries one event that
matches a detection rule for a fresh process, so each batch produces one score push; a
dashboard WebSocket measures emit-to-push latency from it.

    python -m bench.ingest [--agents 50] [--batch 100] [--seconds 10] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import platform
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import socketio

from bench.harness import (
    SECRET,
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
from hub.codec import SocketJson
from hub.config import Settings
from hub.tokens import create_token

HEADERS = [
    "target",
    "encoding",
    "load",
    "agents",
    "batch",
    "events_per_s",
    "ack_p50_ms",
    "ack_p99_ms",
    "push_p50_ms",
    "push_p99_ms",
]


@dataclass
class Result:
    target: str
    agents: int
    batch: int
    encoding: str
    rate: float | None = None  # offered events/s when paced; None = as fast as acks return
    events_per_s: float = 0.0
    ack_ms: list[float] = field(default_factory=list, repr=False)
    push_ms: list[float] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "agents": self.agents,
            "batch": self.batch,
            "encoding": self.encoding,
            "load": f"paced {round(self.rate)}/s" if self.rate else "saturated",
            "events_per_s": round(self.events_per_s),
            "ack_p50_ms": percentile(self.ack_ms, 50),
            "ack_p99_ms": percentile(self.ack_ms, 99),
            "push_p50_ms": percentile(self.push_ms, 50),
            "push_p99_ms": percentile(self.push_ms, 99),
        }


def _events(agent: int, batch_no: int, size: int, seq: int) -> list[dict[str, Any]]:
    now = time.time()
    pid = 100_000 + batch_no
    events: list[dict[str, Any]] = [
        {
            "seq": seq + i,
            "ts": now,
            "kind": "file_open",
            "pid": 2000 + i % 50,
            "path": f"/var/lib/app/{i}.dat",
            "uid": 1000,
        }
        for i in range(size - 1)
    ]
    # One MEDIUM rule hit per batch (SSH key read by a fresh process): a score push, no alert.
    events.append(
        {
            "seq": seq + size - 1,
            "ts": now,
            "kind": "file_open",
            "pid": pid,
            "path": "/home/app/.ssh/id_ed25519",
            "exe": "/usr/bin/python3",
        }
    )
    return events


async def _agent(
    url: str,
    certs: Path,
    index: int,
    result: Result,
    stop_at: float,
    measure_from: float,
    emitted: dict[tuple[str, int], float],
    counted: list[int],
) -> None:
    agent_id = f"bench-{index}"
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(certs / f"{agent_id}.pem", certs / f"{agent_id}.key")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
    client = socketio.AsyncClient(http_session=session, reconnection=False, json=SocketJson)
    hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    client.on("hello", lambda data: hello.done() or hello.set_result(data), namespace="/agent")
    try:
        await client.connect(url, namespaces=["/agent"], transports=["websocket"], wait_timeout=30)
        seq = (await asyncio.wait_for(hello, 30)).get("last_seq", 0) + 1
        batch_no = index * 10_000_000
        interval = result.agents * result.batch / result.rate if result.rate else 0.0
        next_send = time.monotonic() + interval * index / result.agents  # spread the agents out
        while time.monotonic() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                next_send += interval
            batch_no += 1
            events = _events(index, batch_no, result.batch, seq)
            payload: Any = {"events": events}
            if result.encoding == "msgpack":
                import msgpack

                payload = msgpack.packb(payload)
            sent = time.monotonic()
            emitted[(agent_id, events[-1]["pid"])] = time.time()
            ack = await client.call("events", payload, namespace="/agent", timeout=60)
            done = time.monotonic()
            if "error" in ack:
                await asyncio.sleep(ack["error"].get("retry_after_ms", 100) / 1000)
                continue
            seq += len(events)
            if sent >= measure_from and done <= stop_at:
                counted[0] += ack["accepted"]
                result.ack_ms.append((done - sent) * 1000)
    finally:
        await client.disconnect()
        await session.close()


async def _http_agent(
    url: str,
    certs: Path,
    index: int,
    result: Result,
    stop_at: float,
    measure_from: float,
    emitted: dict[tuple[str, int], float],
    counted: list[int],
    secret: str,
) -> None:
    agent_id = f"bench-{index}"
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    seq, batch_no = 1, index * 10_000_000
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() < stop_at:
            batch_no += 1
            events = _events(index, batch_no, result.batch, seq)
            body = orjson.dumps({"events": events})
            stamp = str(int(time.time()))
            signature = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).hexdigest()
            headers = {
                "X-Agent-ID": agent_id,
                "X-Agent-Timestamp": stamp,
                "X-Agent-Signature": signature,
                "Content-Type": "application/json",
            }
            sent = time.monotonic()
            emitted[(agent_id, events[-1]["pid"])] = time.time()
            async with session.post("/api/v1/events", data=body, headers=headers) as response:
                ack = await response.json(content_type=None)
            done = time.monotonic()
            if response.status != 200:
                await asyncio.sleep(0.1)
                continue
            seq += len(events)
            if sent >= measure_from and done <= stop_at:
                counted[0] += ack["accepted"]
                result.ack_ms.append((done - sent) * 1000)


async def _signing_secrets(url: str, certs: Path, token: str, agents: int) -> list[str]:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    headers = {"Authorization": f"Bearer {token}"}
    secrets: list[str] = []
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(ssl=context)) as session:
        for i in range(agents):
            async with session.post(f"/api/v1/agents/bench-{i}/signing-secret", headers=headers) as response:
                secrets.append((await response.json())["secret"])
    return secrets


async def _dashboard(
    url: str,
    token: str,
    certs: Path,
    result: Result,
    stop_at: float,
    measure_from: float,
    emitted: dict[tuple[str, int], float],
) -> None:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        ws = await session.ws_connect(f"{url}/ws/live", headers={"Authorization": f"Bearer {token}"})
        with contextlib.suppress(asyncio.TimeoutError):
            while time.monotonic() < stop_at:
                message = await ws.receive(timeout=max(0.1, stop_at - time.monotonic()))
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(message.data)
                if data["type"] != "score" or time.monotonic() < measure_from:
                    continue
                sent = emitted.pop((data["data"]["agent_id"], data["data"]["pid"]), None)
                if sent is not None:
                    result.push_ms.append((time.time() - sent) * 1000)
        await ws.close()


async def _drive(url: str, certs: Path, result: Result, seconds: float, token: str | None) -> None:
    emitted: dict[tuple[str, int], float] = {}
    counted = [0]
    secrets = (
        await _signing_secrets(url, certs, token or "", result.agents) if result.target == "http" else []
    )
    start = time.monotonic() + 2.0  # connect everyone first
    measure_from = start + 1.0  # then warm up for a second
    stop_at = measure_from + seconds
    if secrets:
        agents = [
            _http_agent(url, certs, i, result, stop_at, measure_from, emitted, counted, secrets[i])
            for i in range(result.agents)
        ]
    else:
        agents = [
            _agent(url, certs, i, result, stop_at, measure_from, emitted, counted)
            for i in range(result.agents)
        ]
    tasks = [asyncio.create_task(agent) for agent in agents]
    if token:
        tasks.append(
            asyncio.create_task(_dashboard(url, token, certs, result, stop_at, measure_from, emitted))
        )
    await asyncio.gather(*tasks)
    result.events_per_s = counted[0] / seconds


def _run_target(
    target: str,
    args: argparse.Namespace,
    certs: Path,
    workdir: Path,
    encoding: str,
    rate: float | None = None,
) -> Result:
    port = free_port()
    data_dir = workdir / f"data-{target}-{encoding}-{'paced' if rate else 'peak'}"
    env = hub_env(data_dir, certs)
    if target in ("hub", "http"):
        command = hub_command(port)
    else:
        command = [sys.executable, "-m", "bench.bare_server", "--port", str(port), "--certs-dir", str(certs)]
    proc = start_server(command, env, port)
    result = Result(target, args.agents, args.batch, encoding, rate)
    token = None
    if target in ("hub", "http"):
        settings = Settings(data_dir=workdir, jwt_secret=SECRET)
        token = create_token(settings, scopes=["hub:admin"], subject="bench")
    try:
        asyncio.run(_drive(f"https://127.0.0.1:{port}", certs, result, args.seconds, token))
    finally:
        stop_server(proc)
    return result


def _say(what: str, args: argparse.Namespace) -> None:
    print(f"running {what} for {args.seconds:g} s...", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Ingest benchmark: the hub beside a bare python-socketio server."
    )
    parser.add_argument("--agents", type=int, default=50, help="concurrent agents (default 50)")
    parser.add_argument("--batch", type=int, default=100, help="events per batch (default 100)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per target (default 10)"
    )
    parser.add_argument("--encoding", choices=["json", "msgpack", "both"], default="json")
    parser.add_argument("--quick", action="store_true", help="4 measured seconds per target")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 4.0
    pin_load_generator()
    encodings = ["json", "msgpack"] if args.encoding == "both" else [args.encoding]
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as tmp:
        workdir = Path(tmp)
        certs = workdir / "certs"
        init_pki(certs, ["127.0.0.1", "localhost"])
        for i in range(args.agents):
            issue_agent(certs, f"bench-{i}")
        runs = [_run_encoding(encoding, args, certs, workdir) for encoding in encodings]
    rows = [result.row() for run in runs for result in run.results]
    print(table(rows, HEADERS))
    summary: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["python -m bench.ingest", *sys.argv[1:]]),
        "rows": rows,
    }
    for run in runs:
        ratio = run.peak["hub"].events_per_s / max(1.0, run.peak["bare"].events_per_s)
        print(f"hub/bare ({run.encoding}): {ratio:.2f}")
        summary[f"ratio_{run.encoding}"] = round(ratio, 3)
    first = runs[0]
    summary.update(
        ingest_events_per_s=round(first.peak["hub"].events_per_s),
        bare_events_per_s=round(first.peak["bare"].events_per_s),
        ack_p99_ms=percentile(first.half_peak.ack_ms, 99),
        push_p99_ms=percentile(first.half_peak.push_ms, 99),
        saturated_ack_p99_ms=percentile(first.peak["hub"].ack_ms, 99),
    )
    if "http" in first.peak:  # measured with JSON batches
        socket_over_http = first.peak["hub"].events_per_s / max(1.0, first.peak["http"].events_per_s)
        print(f"hub socket/HTTP per batch: {socket_over_http:.2f}")
        summary.update(
            http_events_per_s=round(first.peak["http"].events_per_s),
            ratio_socket_http=round(socket_over_http, 3),
        )
    record_results(summary)


@dataclass
class EncodingRun:
    encoding: str
    peak: dict[str, Result]
    half_peak: Result
    results: list[Result]


def _run_encoding(encoding: str, args: argparse.Namespace, certs: Path, workdir: Path) -> EncodingRun:
    results: list[Result] = []
    peak: dict[str, Result] = {}
    for target in ("bare", "hub", "http") if encoding == "json" else ("bare", "hub"):
        _say(f"{target} ({encoding}, {args.agents} agents, batches of {args.batch}), saturated", args)
        peak[target] = _run_target(target, args, certs, workdir, encoding)
        results.append(peak[target])
    # Latency means something at a load the server sustains: half the hub's peak, and the
    # first issue's target rate, a fifth of the bare server's peak.
    half = round(peak["hub"].events_per_s / 2)
    paced: dict[int, Result] = {}
    for rate in sorted({half, round(peak["bare"].events_per_s / 5)}):
        for target in ("bare", "hub"):
            _say(f"{target} ({encoding}), paced at {rate} events/s", args)
            results.append(_run_target(target, args, certs, workdir, encoding, rate=rate))
        paced[rate] = results[-1]
    return EncodingRun(encoding, peak, paced[half], results)


if __name__ == "__main__":
    main()
