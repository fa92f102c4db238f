"""Connections benchmark: what thousands of idle agents cost the hub (memory and CPU).

    python -m bench.connections [--agents 5000] [--steps 4] [--heartbeat 10] [--before TREE]
                                [--offer-compression] [--bare-defaults]

The hub runs as its own process pinned to core 0; this load generator (core 1) connects
agents in steps, each a stock python-socketio client over real mTLS with its own
certificate, and keeps them connected and heartbeating. After each step it waits for the
hub to settle and reads the hub's resident memory and CPU use over one heartbeat interval.
The baseline, in the same run and connected all at once: the bare python-socketio server
(bench.ingest's) over the same mTLS on uvloop, as the hub runs; with `--bare-defaults` also on
asyncio's own loop, as a user would start it.
With `--before`, an earlier checkout's hub goes through the same steps first, in the same run.
With `--offer-compression`, the agents offer WebSocket per-message compression, as browsers and
the JavaScript client do.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import socketio

from bench.harness import (
    add_before_argument,
    free_port,
    hub_command,
    hub_env,
    pin_load_generator,
    record_results,
    start_server,
    stop_server,
    table,
)
from hub.certs import init_pki, issue_agent
from hub.codec import SocketJson

Command = Callable[[int, Path], list[str]]  # (port, certificates folder) -> the server's command line
HEADERS = ["server", "agents", "connected", "connect_per_s", "rss_mb", "kb_per_agent", "cpu_pct_idle"]


class Fleet:
    """Agents held connected, heartbeating every `heartbeat_s`."""

    def __init__(self, url: str, certs: Path, heartbeat_s: float, *, offer_compression: bool = False) -> None:
        self.url = url
        self.certs = certs
        self.heartbeat_s = heartbeat_s
        self.websocket_options = {"compress": 15} if offer_compression else {}
        self.clients: list[tuple[socketio.AsyncClient, aiohttp.ClientSession]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def grow(self, first: int, count: int) -> int:
        """Connect agents `first`..`first + count - 1`, 50 at a time; return how many made it."""
        made = 0
        for start in range(first, first + count, 50):
            batch = range(start, min(start + 50, first + count))
            results = await asyncio.gather(*(self._connect(i) for i in batch), return_exceptions=True)
            made += sum(1 for result in results if result is True)
        return made

    async def _connect(self, index: int) -> bool:
        agent_id = f"fleet-{index}"
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        context.load_cert_chain(self.certs / f"{agent_id}.pem", self.certs / f"{agent_id}.key")
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        client = socketio.AsyncClient(
            http_session=session,
            reconnection=False,
            json=SocketJson,
            websocket_extra_options=self.websocket_options,
        )
        try:
            await client.connect(self.url, namespaces=["/agent"], transports=["websocket"], wait_timeout=60)
        except Exception:
            await session.close()
            return False
        self.clients.append((client, session))
        self.tasks.append(asyncio.create_task(self._beat(client, index)))
        return True

    async def _beat(self, client: socketio.AsyncClient, index: int) -> None:
        await asyncio.sleep(self.heartbeat_s * (index % 100) / 100)  # spread over the interval
        beat: dict[str, Any] = {"cpu_percent": 1.0, "mem_percent": 10.0, "disk_percent": 20.0,
                                "spool_depth": 0, "dropped": 0, "uptime_s": 1.0}  # fmt: skip
        while client.connected:
            await client.emit("heartbeat", {**beat, "ts": time.time()}, namespace="/agent")
            await asyncio.sleep(self.heartbeat_s)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client, session in self.clients:
            await client.disconnect()
            await session.close()


async def run(
    url: str, certs: Path, hub: psutil.Process, steps: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    fleet = Fleet(url, certs, args.heartbeat, offer_compression=args.offer_compression)
    step = args.agents // steps
    rows = []
    base_rss = hub.memory_info().rss
    rows.append(_row(0, 0, None, base_rss, base_rss, await _idle_cpu(hub, args.heartbeat)))
    try:
        for n in range(steps):
            print(f"connecting agents {n * step}..{(n + 1) * step - 1}...", file=sys.stderr, flush=True)
            started = time.monotonic()
            await fleet.grow(n * step, step)
            rate = step / (time.monotonic() - started)
            await asyncio.sleep(2.0)  # handshakes, hellos and presence writes settle
            cpu = await _idle_cpu(hub, args.heartbeat)
            rows.append(_row((n + 1) * step, len(fleet.clients), rate, hub.memory_info().rss, base_rss, cpu))
    finally:
        await fleet.close()
    return rows


async def _idle_cpu(hub: psutil.Process, heartbeat_s: float) -> float:
    """The hub's CPU over one heartbeat interval with everyone connected and nothing else going on."""
    hub.cpu_percent()
    await asyncio.sleep(heartbeat_s)
    return float(hub.cpu_percent())


def _row(agents: int, connected: int, rate: float | None, rss: int, base: int, cpu: float) -> dict[str, Any]:
    return {
        "agents": agents,
        "connected": connected,
        "connect_per_s": round(rate) if rate else None,
        "rss_mb": round(rss / 2**20, 1),
        "kb_per_agent": round((rss - base) / 1024 / connected, 1) if connected else None,
        "cpu_pct_idle": round(cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="What thousands of idle, heartbeating agents cost the hub.")
    parser.add_argument("--agents", type=int, default=5000, help="agents in the end (default 5000)")
    parser.add_argument(
        "--steps", type=int, default=4, help="measure after each of this many steps (default 4)"
    )
    parser.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat interval in s (default 10)")
    parser.add_argument(
        "--offer-compression",
        action="store_true",
        help="agents offer per-message compression, as browsers and the JavaScript client do",
    )
    parser.add_argument(
        "--bare-defaults",
        action="store_true",
        help="also the bare server on asyncio's own loop (its default)",
    )
    add_before_argument(parser)
    args = parser.parse_args()
    pin_load_generator()
    with tempfile.TemporaryDirectory(prefix="agenthub-bench-") as tmp:
        workdir = Path(tmp)
        certs = workdir / "certs"
        init_pki(certs, ["127.0.0.1", "localhost"])
        print(f"issuing {args.agents} agent certificates...", file=sys.stderr, flush=True)
        for i in range(args.agents):
            issue_agent(certs, f"fleet-{i}")
        servers = [
            *([("bare", _bare(), None, 1)] if args.bare_defaults else []),
            ("bare on uvloop", _bare("--uvloop"), None, 1),
            *([(f"hub before ({args.before})", _hub, args.before, args.steps)] if args.before else []),
            ("hub", _hub, None, args.steps),
        ]
        rows = [row for server in servers for row in _measure(*server, workdir, args)]
    print(f"machine: {platform.node()}, {psutil.cpu_count()} cores, Python {platform.python_version()}")
    print(table(rows, HEADERS))
    last = rows[-1]
    if args.offer_compression:  # not the fleet the recorded figures speak of
        record_results({"rss_per_connection_kib_compression_offered": last["kb_per_agent"]})
        return
    bare = next(row for row in reversed(rows) if row["server"] == "bare on uvloop")
    record_results(
        {
            "connections": last["connected"],
            "rss_per_connection_kib": last["kb_per_agent"],
            "bare_rss_per_connection_kib": bare["kb_per_agent"],
            "connect_per_s": last["connect_per_s"],
            "idle_cpu_pct": last["cpu_pct_idle"],
        }
    )


def _bare(*options: str) -> Command:
    def command(port: int, certs: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.bare_server",
            "--port",
            str(port),
            "--certs-dir",
            str(certs),
            *options,
        ]

    return command


def _hub(port: int, certs: Path) -> list[str]:
    return hub_command(port)  # the hub finds its certificates in its environment (HUB_CERTS_DIR)


def _measure(
    name: str,
    command: Command,
    tree: Path | None,
    steps: int,
    workdir: Path,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Connect the agents to server `name` in `steps`; `tree`: the checkout it runs from (None: this)."""
    port, certs = free_port(), workdir / "certs"
    data = workdir / f"data-{name.split()[0]}-{'before' if tree else 'this'}"
    env = hub_env(data, certs, heartbeat_interval_s=str(args.heartbeat))
    proc = start_server(command(port, certs), env, port, cwd=tree)
    try:
        rows = asyncio.run(run(f"https://127.0.0.1:{port}", certs, psutil.Process(proc.pid), steps, args))
    finally:
        stop_server(proc)
    return [{**row, "server": name} for row in rows]


if __name__ == "__main__":
    main()
