"""A dashboard that never reads while the hub pushes thousands of updates a second.

The hub runs as its own process pinned to core 0 (`agenthub serve`, TLS); this process, on
core 1, drives agents making score updates at `--rate` a second (bench.dashboards' load: each
event a fresh process, so each is one push), with one well-behaved dashboard reading them all.
First `--seconds` without the slow one; then a dashboard connects, completes the WebSocket
upgrade over TLS with a 4 KiB receive buffer and never reads again, for another `--seconds`.

PASS iff: the ingest rate with the slow dashboard is within 10% of the rate without it; the
hub's RSS grows, while it hangs, by less than `--max-extra-mb` more than it grew in the same
time without it (every update makes a process the hub keeps: RSS grows a little anyway); and
the hub cut it off (`push_cutoffs`) or coalesced its updates (`push_coalesced`), counted in
`/api/v1/stats`.

    python -m bench.reliability.slow_dashboard [--rate 2000] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.dashboards import AGENTS, Load, _stats
from bench.harness import (
    SECRET,
    free_port,
    hub_command,
    hub_env,
    pin_load_generator,
    start_server,
    stop_server,
)
from hub.certs import init_pki, issue_agent
from hub.config import Settings
from hub.tokens import create_token

SEND_TIMEOUT_S = 3.0  # the hub's HUB_PUSH_SEND_TIMEOUT_S here: a cut-off within the run


async def _reader(url: str, context: ssl.SSLContext, token: str, stop: asyncio.Event) -> None:
    """A dashboard that reads everything (the page as it should be)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.ws_connect(f"{url}/ws/live", headers={"Authorization": f"Bearer {token}"}) as ws,
    ):
        while not stop.is_set():
            await ws.receive(timeout=10)


def _stuck_dashboard(port: int, context: ssl.SSLContext, token: str) -> ssl.SSLSocket:
    """Open `/ws/live`, finish the upgrade, and return the socket, which nobody reads again."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once: the hub feels it
    raw.connect(("127.0.0.1", port))
    conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    conn.sendall(
        f"GET /ws/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(1)  # the headers only, byte by byte: nothing after them is read
    if not answer.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"the upgrade was refused: {answer.decode(errors='replace')}")
    return conn


async def _phase(load: Load, hub: psutil.Process, seconds: float) -> tuple[float, float, float]:
    """Return (acked updates/s, RSS MB at the start, RSS MB growth) over `seconds`."""
    acked, start_rss, peak = load.acked, hub.memory_info().rss, 0
    for _ in range(round(seconds)):
        await asyncio.sleep(1.0)
        peak = max(peak, hub.memory_info().rss)
    return (load.acked - acked) / seconds, start_rss / 2**20, (peak - start_rss) / 2**20


async def run(args: argparse.Namespace, workdir: Path) -> bool:
    certs = workdir / "certs"
    init_pki(certs, ["127.0.0.1", "localhost"])
    for i in range(AGENTS):
        issue_agent(certs, f"bench-{i}")
    port = free_port()
    env = hub_env(workdir / "data", certs, push_send_timeout_s=str(SEND_TIMEOUT_S))
    proc = start_server(hub_command(port), env, port)
    url, hub = f"https://127.0.0.1:{port}", psutil.Process(proc.pid)
    settings = Settings(data_dir=workdir, jwt_secret=SECRET)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    load, stop = Load(url, certs, args.rate), asyncio.Event()
    token = create_token(settings, scopes=["hub:read"], subject="bench-reader")
    tasks = [asyncio.create_task(load.run()), asyncio.create_task(_reader(url, context, token, stop))]
    try:
        await asyncio.sleep(3.0)  # agents connected, the reader past its snapshot
        print(f"without the slow dashboard, {args.seconds:g} s...", file=sys.stderr, flush=True)
        before, _, growth_before = await _phase(load, hub, args.seconds)
        stuck_token = create_token(settings, scopes=["hub:read"], subject="bench-stuck")
        stuck = await asyncio.to_thread(_stuck_dashboard, port, context, stuck_token)
        print(f"with a dashboard that never reads, {args.seconds:g} s...", file=sys.stderr, flush=True)
        during, rss_start, growth = await _phase(load, hub, args.seconds)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            stats: dict[str, Any] = await _stats(session, url, settings)
        stuck.close()
    finally:
        load.stop.set()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_server(proc)
    handled = stats["push_cutoffs"] >= 1 or stats["push_coalesced"] > 0
    passed = during >= 0.9 * before and growth - growth_before < args.max_extra_mb and handled
    print(
        f"{'PASS' if passed else 'FAIL'} slow dashboard: {args.rate:g} updates/s offered; ingest "
        f"{before:,.0f}/s without it, {during:,.0f}/s with it ({during / max(before, 1):.0%}); hub RSS "
        f"{rss_start:.0f} MB when it connected, +{growth:.1f} MB while it hung (+{growth_before:.1f} MB "
        f"in as long without it); cut off {stats['push_cutoffs']}, coalesced {stats['push_coalesced']:,}, "
        f"resyncs {stats['push_resyncs']}"
    )
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="score updates offered a second")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds measured without, then with it")
    parser.add_argument(
        "--max-extra-mb", type=float, default=16.0, help="RSS growth allowed beyond the run without it"
    )
    args = parser.parse_args()
    pin_load_generator()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agenthub-slow-dashboard-") as tmp:
        passed = asyncio.run(run(args, Path(tmp)))
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
