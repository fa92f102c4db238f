"""Webhook deliveries to real local receivers: signatures, retries, restarts, dead letters, lanes, SSRF."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from hub.app import NAMESPACE_KEY
from hub.config import Settings
from hub.store.sqlite import SqliteStore
from tests.conftest import (
    HubStarter,
    RunningHub,
    call,
    client_ssl,
    make_events,
    open_agent,
    sqlite_database_at,
    start_hub,
)
from tests.test_scoring import attack

WEBHOOKS = "/api/v1/webhooks"
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
ALL_TYPES = ["agent_offline", "agent_online", "alert_raised", "certificate_expiring", "certificate_revoked",
             "risk_threshold_crossed"]  # fmt: skip


def verify(secret: str, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    """The README's receiver-side check, as a receiver would write it."""
    pairs = [part.strip().split("=", 1) for part in header.split(",")]
    t = next(value for name, value in pairs if name == "t")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(t)) <= tolerance_s
    return fresh and any(hmac.compare_digest(expected, value) for name, value in pairs if name == "v1")


@dataclass
class Receiver:
    """A real HTTP receiver on 127.0.0.1 that checks every signature and answers as told."""

    port: int = 0
    statuses: list[int] = field(default_factory=list)  # answers to give first, then 200
    delay_s: float = 0.0
    secrets: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    concurrent: int = 0
    most_concurrent: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            body = await request.read()
            if not any(verify(s, body, request.headers["X-AgentHub-Signature"]) for s in self.secrets):
                self.bad_signatures += 1
            self.received.append({"headers": dict(request.headers), "raw": body, "body": orjson.loads(body)})
            await asyncio.sleep(self.delay_s)
            status = self.statuses.pop(0) if self.statuses else 200
            if 300 <= status < 400:
                return web.Response(status=status, headers={"Location": "http://127.0.0.1:1/internal"})
            return web.Response(status=status)
        finally:
            self.concurrent -= 1

    def ids(self) -> set[str]:
        return {r["body"]["delivery_id"] for r in self.received}

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.received if r["body"]["event_type"] == event_type]


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    made: list[Receiver] = []

    async def make(**options: Any) -> Receiver:
        receiver = Receiver(**options)
        await receiver.start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        await receiver.stop()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback receivers over plain http, quick retries and polls."""
    return settings.model_copy(
        update={
            "webhook_allow_http": True,
            "webhook_allow": LOOPBACK,
            "webhook_retry_base_s": 0.05,
            "webhook_retry_max_s": 0.2,
            "webhook_poll_interval_s": 0.05,
            "webhook_timeout_s": 5.0,
        }
    )


def client(hub: RunningHub) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    return aiohttp.ClientSession(base_url=hub.url, connector=connector)


async def subscribe(http: aiohttp.ClientSession, hub: RunningHub, receiver: Receiver, **fields: Any) -> str:
    body = {"url": receiver.url, "event_types": ["alert_raised"], **fields}
    status, webhook = await call(http, hub, "POST", WEBHOOKS, body)
    assert status == 201, webhook
    receiver.secrets.append(webhook["secret"])
    return str(webhook["id"])


async def ping(http: aiohttp.ClientSession, hub: RunningHub, webhook_id: str) -> dict[str, Any]:
    status, delivery = await call(http, hub, "POST", f"{WEBHOOKS}/{webhook_id}:test")
    assert status == 202, delivery
    assert (delivery["event_type"], delivery["state"], delivery["attempts"]) == ("ping", "pending", 0)
    return dict(delivery)


async def deliveries(
    http: aiohttp.ClientSession, hub: RunningHub, webhook_id: str, state: str = ""
) -> list[Any]:
    query = f"?state={state}" if state else ""
    status, page = await call(http, hub, "GET", f"{WEBHOOKS}/{webhook_id}/deliveries{query}")
    assert status == 200, page
    return list(page["data"])


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def settled(
    http: aiohttp.ClientSession, hub: RunningHub, webhook_id: str, state: str, count: int
) -> None:
    async def check() -> bool:
        return len(await deliveries(http, hub, webhook_id, state)) == count

    await until(check)


# delivery, retries, restarts --------------------------------------------------------------


async def test_a_receiver_down_then_failing_then_back_gets_everything_across_a_restart(
    settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    receiver = await receivers()
    port = receiver.port
    await receiver.stop()  # down: nothing listens there
    settings = settings.model_copy(update={"webhook_max_attempts": 1000})
    runner, hub = await start_hub(settings)
    try:
        async with client(hub) as http:
            webhook_id = await subscribe(http, hub, receiver)
            sent = [(await ping(http, hub, webhook_id))["id"] for _ in range(3)]

            async def tried() -> bool:
                return all(d["attempts"] >= 2 for d in await deliveries(http, hub, webhook_id))

            await until(tried)
            failed = await deliveries(http, hub, webhook_id, "pending")
            assert len(failed) == 3
            assert all("ClientConnectorError" in d["last_error"] for d in failed)
            assert all(d["last_status"] is None for d in failed)
    finally:
        await runner.cleanup()

    receiver.port, receiver.statuses = port, [500] * 4
    await receiver.start()
    runner, hub = await start_hub(settings)  # the same data dir: the outbox survived
    try:
        async with client(hub) as http:
            await settled(http, hub, webhook_id, "delivered", 3)
            assert await deliveries(http, hub, webhook_id, "pending") == []
            status, webhook = await call(http, hub, "GET", f"{WEBHOOKS}/{webhook_id}")
            assert status == 200
            assert webhook["deliveries"]["pending"] == webhook["deliveries"]["dead"] == 0
            assert webhook["deliveries"]["last_status"] == 200
    finally:
        await runner.cleanup()
    assert receiver.ids() == set(sent)
    assert receiver.bad_signatures == 0
    assert len(receiver.received) >= 3 + 4  # the four 500s were retried
    by_id: dict[str, bytes] = {}
    for got in receiver.received:  # a duplicate carries the same id and the same bytes
        assert by_id.setdefault(got["body"]["delivery_id"], got["raw"]) == got["raw"]
        headers = got["headers"]
        assert headers["X-AgentHub-Delivery"] == got["body"]["delivery_id"]
        assert headers["X-AgentHub-Event"] == "ping"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"].startswith("AgentHub-Webhooks/")


async def test_dead_after_max_attempts_visible_and_redelivered(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"webhook_max_attempts": 3})
    receiver = await receivers(statuses=[500] * 3)
    async with client(hub) as http:
        webhook_id = await subscribe(http, hub, receiver)
        sent = await ping(http, hub, webhook_id)
        await settled(http, hub, webhook_id, "dead", 1)
        [dead] = await deliveries(http, hub, webhook_id, "dead")
        assert (dead["id"], dead["attempts"], dead["last_status"]) == (sent["id"], 3, 500)
        assert dead["last_error"] == "the receiver answered 500"
        assert dead["next_attempt_at"] is None
        status, webhook = await call(http, hub, "GET", f"{WEBHOOKS}/{webhook_id}")
        assert (webhook["deliveries"]["dead"], webhook["deliveries"]["last_status"]) == (1, 500)
        assert await deliveries(http, hub, webhook_id, "delivered") == []

        redeliver = f"{WEBHOOKS}/{webhook_id}/deliveries/{sent['id']}:redeliver"
        status, again = await call(http, hub, "POST", redeliver)
        assert status == 200, again
        assert (again["state"], again["attempts"]) == ("pending", 0)
        await settled(http, hub, webhook_id, "delivered", 1)
        unknown = f"{WEBHOOKS}/{webhook_id}/deliveries/whd_{'0' * 32}:redeliver"
        assert (await call(http, hub, "POST", unknown))[0] == 404
    assert [r["body"]["delivery_id"] for r in receiver.received][:4] == [sent["id"]] * 4
    assert len({r["raw"] for r in receiver.received[:4]}) == 1
    assert receiver.bad_signatures == 0


async def test_finished_deliveries_are_pruned_after_their_retention_and_pending_ones_kept(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"webhook_max_attempts": 1000})
    fine, failing = await receivers(), await receivers(statuses=[500] * 1000)
    async with client(hub) as http:
        delivered_to, pending_at = await subscribe(http, hub, fine), await subscribe(http, hub, failing)
        await ping(http, hub, delivered_to)
        await ping(http, hub, pending_at)
        await settled(http, hub, delivered_to, "delivered", 1)
        assert await hub.store.prune_deliveries(before=time.time() - 60) == 0  # not old enough yet
        assert await hub.store.prune_deliveries(before=time.time() + 1) == 1
        assert await deliveries(http, hub, delivered_to) == []
        assert [d["state"] for d in await deliveries(http, hub, pending_at)] == ["pending"]


async def test_a_pending_delivery_cannot_be_redelivered(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"webhook_max_attempts": 1000})
    receiver = await receivers(statuses=[500] * 1000)
    async with client(hub) as http:
        webhook_id = await subscribe(http, hub, receiver)
        sent = await ping(http, hub, webhook_id)
        status, problem = await call(
            http, hub, "POST", f"{WEBHOOKS}/{webhook_id}/deliveries/{sent['id']}:redeliver"
        )
        assert status == 409, problem
        assert "pending" in problem["detail"]


async def test_a_rotated_secret_signs_beside_the_new_one(
    hub: RunningHub, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    receiver = await receivers()
    async with client(hub) as http:
        webhook_id = await subscribe(http, hub, receiver)
        old = receiver.secrets.pop()
        path = f"{WEBHOOKS}/{webhook_id}"
        status, rotated = await call(http, hub, "POST", f"{path}:rotate-secret", {"keep_previous_s": 600})
        assert status == 200
        await ping(http, hub, webhook_id)
        await settled(http, hub, webhook_id, "delivered", 1)
    header = receiver.received[0]["headers"]["X-AgentHub-Signature"]
    assert header.count("v1=") == 2
    assert verify(old, receiver.received[0]["raw"], header)
    assert verify(rotated["secret"], receiver.received[0]["raw"], header)
    assert not verify("whsec_wrong", receiver.received[0]["raw"], header)


# lanes -----------------------------------------------------------------------------------


async def test_a_slow_receiver_delays_neither_other_webhooks_nor_ingest(
    hub: RunningHub, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    slow, fast = await receivers(delay_s=3.0), await receivers()
    async with client(hub) as http:
        slow_id, fast_id = await subscribe(http, hub, slow), await subscribe(http, hub, fast)
        for _ in range(3):
            await ping(http, hub, slow_id)
        await until(lambda: asyncio.sleep(0, bool(slow.received)))
        started = time.monotonic()
        await ping(http, hub, fast_id)
        await until(lambda: asyncio.sleep(0, bool(fast.received)), timeout_s=2.0)
        assert time.monotonic() - started < 1.5
        agent = await open_agent(hub, "agent-1")
        try:
            started = time.monotonic()
            ack = await agent.send({"events": make_events(1, 100)})
            assert ack["accepted"] == 100
            assert time.monotonic() - started < 1.5
        finally:
            await agent.close()
        assert len(slow.received) == 1  # one lane: the next waits for this one
    assert slow.most_concurrent == 1


# the destination guard at delivery time ----------------------------------------------------


async def test_a_destination_refused_at_delivery_fails_with_the_guards_reason(
    settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    receiver = await receivers()
    runner, hub = await start_hub(settings)
    try:
        async with client(hub) as http:
            literal_id = await subscribe(http, hub, receiver)
            by_name = Receiver(port=receiver.port)
            name_id = await subscribe(http, hub, by_name, url=f"http://localhost:{receiver.port}/hook")
    finally:
        await runner.cleanup()
    # The network is no longer allowed: what passed at creation is refused at delivery.
    runner, hub = await start_hub(settings.model_copy(update={"webhook_allow": [],
                                                              "webhook_max_attempts": 1}))  # fmt: skip
    try:
        async with client(hub) as http:
            for webhook_id in (literal_id, name_id):
                await ping(http, hub, webhook_id)
                await settled(http, hub, webhook_id, "dead", 1)
            [literal] = await deliveries(http, hub, literal_id)
            assert literal["last_error"] == (
                "127.0.0.1 is a loopback address; allow it with HUB_WEBHOOK_ALLOW"
            )
            [named] = await deliveries(http, hub, name_id)
            assert named["last_error"].startswith("localhost resolves to ")
            assert "a loopback address" in named["last_error"]
    finally:
        await runner.cleanup()
    assert receiver.received == []


async def test_a_redirect_is_a_failed_attempt_never_followed(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"webhook_max_attempts": 1})
    receiver = await receivers(statuses=[302])
    async with client(hub) as http:
        webhook_id = await subscribe(http, hub, receiver)
        await ping(http, hub, webhook_id)
        await settled(http, hub, webhook_id, "dead", 1)
        [dead] = await deliveries(http, hub, webhook_id)
    assert dead["last_status"] == 302
    assert dead["last_error"] == "redirected (302) to http://127.0.0.1:1/internal: redirects are not followed"
    assert len(receiver.received) == 1


# end to end ------------------------------------------------------------------------------


async def test_an_attack_a_disconnect_and_a_revocation_reach_the_receiver(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with(
        {"webhook_certificate_expiring_days": 400.0, "webhook_certificate_check_interval_s": 0.1}
    )
    receiver = await receivers()
    async with client(hub) as http:
        await subscribe(http, hub, receiver, event_types=ALL_TYPES)
        agent = await open_agent(hub, "agent-1")
        try:
            assert (await agent.send({"events": attack()}))["accepted"] == 4
            await hub.settle()
            await until(lambda: asyncio.sleep(0, bool(receiver.of("risk_threshold_crossed"))))
        finally:
            await agent.close()
        await until(lambda: asyncio.sleep(0, bool(receiver.of("agent_offline"))))
        fingerprint = (await hub.store.get_agent("agent-1"))["cert_fingerprint"]
        status, revoked = await call(
            http, hub, "POST", f"/api/v1/certificates/{fingerprint}:revoke", {"reason": "key leaked"}
        )
        assert status == 200, revoked
        await until(lambda: asyncio.sleep(0, bool(receiver.of("certificate_revoked"))))
        await until(lambda: asyncio.sleep(0, bool(receiver.of("certificate_expiring"))))
        await asyncio.sleep(0.5)  # several checks later, still announced once

    assert receiver.bad_signatures == 0
    raised = receiver.of("alert_raised")
    crossed = receiver.of("risk_threshold_crossed")
    assert raised
    assert crossed
    for body in raised + crossed:
        assert {"event_type", "process_id", "risk_score", "threshold", "timestamp", "delivery_id"} <= set(
            body
        )
        assert body["process_id"].startswith("agent-1:")
        assert body["delivery_id"].startswith("whd_")
    assert all(body["threshold"] is not None for body in crossed)
    assert {body["alert_id"] for body in crossed} <= {body["alert_id"] for body in raised}
    [online] = receiver.of("agent_online")
    [offline] = receiver.of("agent_offline")
    assert (online["agent_id"], online["reason"]) == ("agent-1", "connected")
    assert offline["agent_id"] == "agent-1"
    [revocation] = receiver.of("certificate_revoked")
    assert (revocation["fingerprint"], revocation["reason"]) == (fingerprint, "key leaked")
    [expiring] = receiver.of("certificate_expiring")
    assert expiring["fingerprint"] == fingerprint
    assert 0 < expiring["expires_in_s"] <= 400 * 86_400


async def test_a_restart_announces_only_the_agents_that_did_not_come_back(
    settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    settings = settings.model_copy(update={"handover_grace_s": 1.5, "drain_reconnect_window_s": 0.0})
    receiver = await receivers()
    runner, hub = await start_hub(settings)
    try:
        async with client(hub) as http:
            await subscribe(http, hub, receiver, event_types=["agent_online", "agent_offline"])
        agents = [await open_agent(hub, agent_id) for agent_id in ("agent-1", "agent-2")]
        await until(lambda: asyncio.sleep(0, len(receiver.of("agent_online")) == 2))
        await hub.app[NAMESPACE_KEY].drain()  # a stop (SIGTERM) sends every agent away
        for agent in agents:
            await agent.close()
    finally:
        await runner.cleanup()
    runner, hub = await start_hub(settings)  # restarted: agent-1 comes back, agent-2 does not
    try:
        back = await open_agent(hub, "agent-1")
        await until(lambda: asyncio.sleep(0, bool(receiver.of("agent_offline"))))
        await asyncio.sleep(0.5)  # nothing more comes
        assert [(body["agent_id"], body["reason"]) for body in receiver.of("agent_offline")] == [
            ("agent-2", "server_shutdown")
        ]
        assert [body["agent_id"] for body in receiver.of("agent_online")] == ["agent-1", "agent-2"]
        late = await open_agent(hub, "agent-2")  # announced gone, so announced back
        await until(lambda: asyncio.sleep(0, len(receiver.of("agent_online")) == 3))
        await back.close()
        await late.close()
    finally:
        await runner.cleanup()
    assert receiver.of("agent_online")[2]["agent_id"] == "agent-2"


async def test_min_severity_filters_alerts(
    hub: RunningHub, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    everything, critical = await receivers(), await receivers()
    async with client(hub) as http:
        await subscribe(http, hub, everything)
        await subscribe(http, hub, critical, min_severity="CRITICAL")
        agent = await open_agent(hub, "agent-1")
        try:
            assert (await agent.send({"events": attack()}))["accepted"] == 4
            await hub.settle()
        finally:
            await agent.close()
        await until(lambda: asyncio.sleep(0, len(critical.received) >= 1))
        await until(lambda: asyncio.sleep(0, len(everything.received) > len(critical.received)))
    assert {body["severity"] for body in critical.of("alert_raised")} == {"CRITICAL"}
    assert "HIGH" in {body["severity"] for body in everything.of("alert_raised")}


# the migration -------------------------------------------------------------------------------


async def test_the_migration_converts_the_old_event_types(settings: Settings) -> None:
    conn = sqlite_database_at(settings, 11)
    for n, types in enumerate((["alert"], ["agent", "command"], ["command"], ["alert", "agent"])):
        conn.execute(
            "INSERT INTO webhooks (id, url, event_types, enabled, secret, created_at, updated_at, "
            "created_by) VALUES (?, 'https://1.1.1.1/h', ?, 1, 's', 0, 0, 'x')",
            (f"wh_{n:032x}", orjson.dumps(types).decode()),
        )
    conn.commit()
    conn.close()
    store = SqliteStore(settings.db_path)
    await store.open()
    try:
        found = [
            (w["event_types"], w["enabled"]) for w in (await store.list_webhooks(after=None, limit=10)).items
        ]
    finally:
        await store.close()
    assert found == [
        (["alert_raised", "risk_threshold_crossed"], True),
        (["agent_offline", "agent_online"], True),
        (["alert_raised"], False),
        (["agent_offline", "agent_online", "alert_raised", "risk_threshold_crossed"], True),
    ]
