"""An agent frozen with SIGSTOP goes offline within its window; after SIGCONT it flushes its spool."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from tests.conftest import HubStarter, RunningHub

EVENTS = 1500
RATE = 150  # events/s: the replay lasts 10 s, the freeze falls in its middle


async def _until(what: str, holds: Callable[[], Awaitable[bool]], limit_s: float) -> float:
    """Poll until `holds()`; return the seconds it took."""
    started = time.monotonic()
    while not await holds():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"agent-1 never {what} within {limit_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def _status(hub: RunningHub, status: str) -> Callable[[], Awaitable[bool]]:
    async def holds() -> bool:
        row = await hub.store.get_agent("agent-1")
        return row is not None and row["status"] == status

    return holds


async def test_a_frozen_agent_goes_offline_and_flushes_its_spool_when_thawed(
    hub_with: HubStarter, tmp_path: Path
) -> None:
    # Heartbeats every 0.5 s: late after 0.75 s, offline after 1.5 s.
    hub = await hub_with({"heartbeat_interval_s": 0.5})
    replay = tmp_path / "events.jsonl"
    lines = (
        orjson.dumps({"ts": 1.0 + n, "kind": "file_open", "pid": 4000, "path": f"/tmp/{n}"})
        for n in range(EVENTS)
    )
    replay.write_bytes(b"\n".join(lines) + b"\n")
    certs = hub.certs
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_client.cli", "run", "--hub", hub.url,
        "--cert", str(certs / "agent-1.pem"), "--key", str(certs / "agent-1.key"),
        "--ca", str(certs / "ca.pem"),
        "--spool", str(tmp_path / "spool.db"), "--replay", str(replay), "--replay-rate", str(RATE),
        "--exit-when-drained", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def streaming() -> bool:
            return await hub.store.count_events("agent-1") >= 200

        await _until("streamed", streaming, 30.0)
        agent.send_signal(signal.SIGSTOP)
        took = await _until("went offline", _status(hub, "offline"), 10.0)
        offline = await hub.store.get_agent("agent-1")
        assert offline["status_reason"] == "missed_heartbeats"
        assert took < 1.5 + 1.0, f"offline {took:.2f} s after the freeze: the window is 1.5 s"
        stored_when_offline = await hub.store.count_events("agent-1")
        await asyncio.sleep(1.0)  # frozen: nothing more arrives
        assert await hub.store.count_events("agent-1") == stored_when_offline

        agent.send_signal(signal.SIGCONT)
        await _until("came back", _status(hub, "online"), 15.0)
        async with asyncio.timeout(60):
            _, errors = await agent.communicate()
        assert agent.returncode == 0, errors.decode()[-2000:]
        assert await hub.store.count_events("agent-1") == EVENTS  # every spooled event, each once
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGCONT)
            agent.kill()
            await agent.wait()
