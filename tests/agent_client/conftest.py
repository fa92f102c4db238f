"""Fixtures that run the real agent session against the real hub of `tests/conftest.py`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_client.session import AgentSession
from agent_client.spool import Spool
from hub.config import Settings
from tests.conftest import RunningHub


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The hub's settings with a short heartbeat, so heartbeats show up within a test."""
    return settings.model_copy(update={"heartbeat_interval_s": 0.5})


async def generate(count: int, *, pid: int = 4242, kind: str = "file_open") -> AsyncIterator[dict[str, Any]]:
    """Yield `count` distinct events, as a collector would."""
    for index in range(count):
        yield {"ts": time.time(), "kind": kind, "pid": pid, "path": f"/tmp/agent-test-{index}"}


@dataclass
class RunningAgent:
    session: AgentSession
    task: asyncio.Task[None]

    async def drained(self, limit_s: float = 20.0) -> None:
        """Wait until the hub has stored every event, failing fast if the session died."""
        waiter = asyncio.ensure_future(self.session.wait_drained())
        await asyncio.wait({waiter, self.task}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            if self.task.done():
                self.task.result()
            raise AssertionError(f"not drained within {limit_s}s (acked {self.session.acked_seq})")

    async def stop(self) -> None:
        await self.session.stop()
        with contextlib.suppress(Exception):
            await self.task


StartAgent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def start_agent(hub: RunningHub, tmp_path: Path) -> AsyncIterator[StartAgent]:
    """Start real agent sessions: `await start_agent(source, agent_id="agent-1", ...)`."""
    running: list[RunningAgent] = []

    async def start(
        source: AsyncIterator[dict[str, Any]] | None = None,
        *,
        agent_id: str = "agent-1",
        certs: Path | None = None,
        spool: Spool | Path | None = None,
        **options: Any,
    ) -> RunningAgent:
        folder = certs or hub.certs
        session = AgentSession(
            hub.url,
            folder / f"{agent_id}.pem",
            folder / f"{agent_id}.key",
            hub.certs / "ca.pem",
            spool if spool is not None else tmp_path / f"{agent_id}-spool.db",
            reconnection_delay=0.2,
            reconnection_delay_max=1.0,
            randomization_factor=0.1,
            **options,
        )
        agent = RunningAgent(session, asyncio.create_task(session.run(source)))
        running.append(agent)
        return agent

    yield start
    for agent in running:
        await agent.stop()


async def until(check: Callable[[], Any], limit_s: float = 10.0) -> None:
    """Poll `check` until it is truthy."""
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class QueueSource:
    """An event source the test feeds by hand; `close()` ends it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._count = 0

    def feed(self, count: int) -> None:
        for _ in range(count):
            self._count += 1
            self._queue.put_nowait(
                {"ts": time.time(), "kind": "custom", "pid": 1, "path": f"/e{self._count}"}
            )

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while (event := await self._queue.get()) is not None:
            yield event
