"""SIEM forwarding to a real local stand-in: batches, severities, 429s, outages, restarts, leases."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
from aiohttp import web

from hub.config import Settings
from hub.siem import SiemForwarder, retry_after_s
from hub.store.sqlite import SqliteStore
from tests.conftest import RunningHub, free_port, make_events, open_agent, start_hub
from tests.test_scoring import attack

API_KEY = "siem-key-" + "k" * 32
HIGH_SEQS = {2, 3, 4}  # attack(): the shell from nginx, the reverse-shell port, /etc/shadow


def below_high(start_seq: int) -> list[dict[str, Any]]:
    """Events matching only LOW and MEDIUM rules, then plain events matching none."""
    ts = 1_700_000_100.0
    return [
        {"seq": start_seq, "ts": ts, "kind": "file_write", "pid": 300, "path": "/home/u/.bashrc"},  # LOW
        {"seq": start_seq + 1, "ts": ts + 1, "kind": "process_start", "pid": 301, "ppid": 1,
         "exe": "/tmp/dropper", "comm": "dropper", "argv": ["/tmp/dropper"], "uid": 1000},  # MEDIUM
        *make_events(start_seq + 2, 5, pid=302),
    ]  # fmt: skip


@dataclass
class Siem:
    """A real SIEM stand-in on 127.0.0.1: checks the bearer key, records batches, answers as told."""

    port: int = 0
    statuses: list[int] = field(default_factory=list)  # answers to give POSTs first, then 200
    retry_after: str = "2"
    requests: list[dict[str, Any]] = field(default_factory=list)
    health_checks: int = 0
    bad_keys: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/health", self._health)
        app.router.add_post("/api/v1/alerts", self._batch)
        app.router.add_post("/api/v1/events/batch", self._batch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _authorized(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") == f"Bearer {API_KEY}":
            return True
        self.bad_keys += 1
        return False

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.json_response({"status": "ok"}, status=200 if self._authorized(request) else 401)

    async def _batch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        body = orjson.loads(await request.read())
        status = self.statuses.pop(0) if self.statuses else 200
        self.requests.append({"at": time.monotonic(), "path": request.path, "body": body, "status": status})
        headers = {"Retry-After": self.retry_after} if status == 429 else {}
        return web.Response(status=status, headers=headers)

    def accepted(self, kind: str) -> list[dict[str, Any]]:
        """Every item of `kind` (alerts or events) in batches answered 2xx."""
        path = "/api/v1/alerts" if kind == "alerts" else "/api/v1/events/batch"
        return [
            item
            for r in self.requests
            if r["path"] == path and r["status"] == 200
            for item in r["body"][kind]
        ]


@pytest.fixture
async def siems() -> AsyncIterator[Callable[..., Awaitable[Siem]]]:
    made: list[Siem] = []

    async def make(**options: Any) -> Siem:
        siem = Siem(**options)
        await siem.start()
        made.append(siem)
        return siem

    yield make
    for siem in made:
        await siem.stop()


def forwarding(settings: Settings, siem_url: str, **overrides: Any) -> Settings:
    """Settings forwarding to a loopback stand-in over plain http, with quick batches and retries."""
    return settings.model_copy(
        update={
            "siem_endpoint": siem_url,
            "siem_api_key": pydantic.SecretStr(API_KEY),
            "siem_allow_http": True,
            "siem_batch_interval_s": 0.2,
            "siem_retry_base_s": 0.05,
            "siem_retry_max_s": 0.2,
            **overrides,
        }
    )


async def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def send(hub: RunningHub, events: list[dict[str, Any]]) -> None:
    agent = await open_agent(hub, "agent-1")
    try:
        ack = await agent.send({"events": events})
        assert ack["accepted"] == len(events)
    finally:
        await agent.close()
    await hub.settle()


async def alert_ids(hub: RunningHub) -> list[str]:
    page = await hub.store.list_alerts(agent_id=None, severity=None, after=None, limit=100)
    return sorted(alert["id"] for alert in page.items)


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# forwarding -------------------------------------------------------------------------------


async def test_alerts_and_high_events_reach_the_siem_in_batches_and_nothing_below(
    settings: Settings, siems: Callable[..., Awaitable[Siem]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    siem = await siems()
    runner, hub = await start_hub(forwarding(settings, siem.url, siem_batch_max=2))
    try:
        await send(hub, attack() + below_high(5))
        stored = await alert_ids(hub)
        assert len(stored) >= 4
        await until(lambda: len(siem.accepted("alerts")) >= len(stored) and len(siem.accepted("events")) >= 3)
        await asyncio.sleep(0.5)  # nothing else is on its way
        assert await hub.store.siem_queue_depth() == 0
    finally:
        await runner.cleanup()
    assert sorted(alert["id"] for alert in siem.accepted("alerts")) == stored
    events = siem.accepted("events")
    assert sorted(e["event"]["seq"] for e in events) == sorted(HIGH_SEQS)
    assert all(e["severity"] in ("HIGH", "CRITICAL") and e["agent_id"] == "agent-1" for e in events)
    shadow = next(e for e in events if e["event"]["seq"] == 4)
    assert shadow["process_id"] == "agent-1:200"
    assert shadow["event"]["path"] == "/etc/shadow"
    assert [r["rule_id"] for r in shadow["rules"]] == ["shadow-read"]
    assert shadow["rules"][0]["mitre"]
    batches = [r for r in siem.requests if r["path"] == "/api/v1/alerts"]
    assert len(batches) >= 2
    assert all(1 <= len(r["body"]["alerts"]) <= 2 for r in batches)
    assert siem.health_checks == 1
    assert siem.bad_keys == 0
    assert f"SIEM at {siem.url} reachable" in messages(caplog)
    assert API_KEY not in messages(caplog)
    assert API_KEY not in caplog.text


async def test_a_429_with_retry_after_is_honoured_and_nothing_lost(
    settings: Settings, siems: Callable[..., Awaitable[Siem]]
) -> None:
    siem = await siems(statuses=[429], retry_after="2")
    runner, hub = await start_hub(forwarding(settings, siem.url))
    try:
        await send(hub, attack())
        stored = await alert_ids(hub)
        await until(lambda: len(siem.accepted("alerts")) == len(stored) and len(siem.accepted("events")) == 3)
    finally:
        await runner.cleanup()
    first, later = siem.requests[0], siem.requests[1:]
    assert first["status"] == 429
    assert later[0]["at"] - first["at"] >= 2.0  # nothing asked before Retry-After
    # The refused batch is sent again first of its kind; alerts go before events, so when the
    # refused one was an events batch, an alerts batch may come in between.
    again = next(request for request in later if request["path"] == first["path"])
    (kind,) = first["body"]
    assert again["body"][kind][: len(first["body"][kind])] == first["body"][kind]
    assert sorted(alert["id"] for alert in siem.accepted("alerts")) == stored


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = time.time()
    assert retry_after_s("2", now) == 2.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.0 <= (retry_after_s(later, now) or 0) <= 31.0
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_s("soon", now) is None
    assert retry_after_s(None, now) is None
    assert retry_after_s("99999999", now) == 3600.0


# outages and restarts ----------------------------------------------------------------------


async def test_a_siem_down_at_start_is_logged_and_gets_everything_once_up(
    settings: Settings, siems: Callable[..., Awaitable[Siem]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runner, hub = await start_hub(forwarding(settings, url))
    try:
        await until(lambda: "unreachable" in messages(caplog))
        assert f"SIEM at {url} unreachable (ClientConnectorError" in messages(caplog)
        assert "alerts queue until it answers" in messages(caplog)
        await send(hub, attack())  # the hub started and ingests
        stored = await alert_ids(hub)
        assert await hub.store.siem_queue_depth() == len(stored) + 3
        await until(lambda: f"forwarding to the SIEM at {url} failed" in messages(caplog))  # and retried
        siem = await siems(port=port)
        await until(lambda: len(siem.accepted("alerts")) == len(stored) and len(siem.accepted("events")) == 3)
        await until(lambda: "answering again" in messages(caplog))
    finally:
        await runner.cleanup()
    assert API_KEY not in caplog.text


async def test_queued_rows_survive_a_restart(
    settings: Settings, siems: Callable[..., Awaitable[Siem]]
) -> None:
    siem = await siems(statuses=[500] * 1000)
    configured = forwarding(settings, siem.url)
    runner, hub = await start_hub(configured)
    try:
        await send(hub, attack())
        stored = await alert_ids(hub)
        await until(lambda: len(siem.requests) >= 2)  # tried, and failed
    finally:
        await runner.cleanup()
    siem.statuses.clear()
    tried = len(siem.requests)
    runner, hub = await start_hub(configured)  # the same data dir: the queue survived
    try:
        await until(lambda: len(siem.accepted("alerts")) == len(stored) and len(siem.accepted("events")) == 3)
        assert await hub.store.siem_queue_depth() == 0
    finally:
        await runner.cleanup()
    assert sorted(alert["id"] for alert in siem.accepted("alerts")) == stored
    assert len(siem.requests) > tried


async def test_a_full_queue_drops_the_oldest_events_never_alerts(
    settings: Settings, siems: Callable[..., Awaitable[Siem]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    siem = await siems(statuses=[503] * 1000)
    runner, hub = await start_hub(forwarding(settings, siem.url, siem_max_queue=2))
    try:
        await send(hub, attack())
        stored = await alert_ids(hub)
        assert len(stored) > 2
        await until(lambda: "SIEM queue full" in messages(caplog))
        assert await hub.store.siem_queue_depth() == len(stored)  # every alert kept, every event dropped
    finally:
        await runner.cleanup()
    assert "dropped the 3 oldest events" in messages(caplog)


async def test_unconfigured_queues_nothing(hub: RunningHub, caplog: pytest.LogCaptureFixture) -> None:
    await send(hub, attack())
    assert await alert_ids(hub)
    assert await hub.store.siem_queue_depth() == 0


async def test_unconfigured_logs_that_forwarding_is_off(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner, _ = await start_hub(settings)
    try:
        await until(lambda: "SIEM forwarding off (HUB_SIEM_ENDPOINT not set)" in messages(caplog))
    finally:
        await runner.cleanup()


def test_the_endpoint_must_use_https_and_have_a_key(settings: Settings) -> None:
    fields = settings.model_dump() | {"siem_api_key": API_KEY}
    assert Settings(**fields | {"siem_endpoint": "https://siem.example.com"}).siem_endpoint
    with pytest.raises(pydantic.ValidationError, match="must use https"):
        Settings(**fields | {"siem_endpoint": "http://siem.example.com"})
    with pytest.raises(pydantic.ValidationError, match="https:// URL"):
        Settings(**fields | {"siem_endpoint": "siem.example.com"})
    with pytest.raises(pydantic.ValidationError, match="siem_api_key is required"):
        Settings(**fields | {"siem_endpoint": "https://siem.example.com", "siem_api_key": None})


# nodes sharing a database --------------------------------------------------------------------


async def test_nodes_sharing_the_queue_never_send_the_same_batch(
    settings: Settings, siems: Callable[..., Awaitable[Siem]], tmp_path: Path
) -> None:
    siem = await siems()
    store = SqliteStore(tmp_path / "shared" / "hub.db")
    await store.open()
    bodies = [{"agent_id": "agent-1", "n": n} for n in range(300)]
    await store.insert_alerts([], siem_events=bodies)
    nodes = [
        SiemForwarder(forwarding(settings, siem.url, node_id=f"node-{i}", siem_batch_max=7), store)
        for i in range(3)
    ]
    tasks = [asyncio.create_task(node.run()) for node in nodes]
    try:
        await until(lambda: len(siem.accepted("events")) >= len(bodies))
        await asyncio.sleep(0.3)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        depth = await store.siem_queue_depth()
        await store.close()
    assert sorted(e["n"] for e in siem.accepted("events")) == list(range(300))
    assert depth == 0
    assert all(len(r["body"]["events"]) <= 7 for r in siem.requests)
