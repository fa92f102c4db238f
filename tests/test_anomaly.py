"""Agent anomaly detection: bursts, silences and kind-mix shifts against each agent's baseline; throttles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentConn, HubStarter, RunningHub, call, client_ssl, make_events, open_agent

# Tiny intervals so a test sees a baseline learned and judged within seconds.
QUICK = {
    "anomaly_interval_s": 0.3,
    "anomaly_warmup_intervals": 3,
    "anomaly_span_intervals": 5,
    "anomaly_z_threshold": 3.0,
    "anomaly_min_factor": 3.0,
    "anomaly_min_events": 100,
    "anomaly_silence_intervals": 2,
    "anomaly_silence_min_mean": 5.0,
}
STEADY_PAUSE_S = 0.05  # about 6 batches an interval


async def session_to(hub: RunningHub) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=hub.url, connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    )


@pytest.fixture
async def http_to() -> AsyncIterator[Any]:
    """Open operator sessions to hubs started with `hub_with`; closed at the end."""
    sessions: list[aiohttp.ClientSession] = []

    async def open_session(hub: RunningHub) -> aiohttp.ClientSession:
        sessions.append(await session_to(hub))
        return sessions[-1]

    yield open_session
    for session in sessions:
        await session.close()


class Sender:
    """One agent sending numbered batches of events."""

    def __init__(self, conn: AgentConn) -> None:
        self.conn = conn
        self.seq = 1

    async def batch(self, count: int, kind: str = "file_open") -> dict[str, Any]:
        ack: dict[str, Any] = await self.conn.send({"events": make_events(self.seq, count, kind=kind)})
        if "error" not in ack:
            self.seq += count
        return ack

    async def steady(self, seconds: float, *, per_batch: int = 5, kind: str = "file_open") -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            ack = await self.batch(per_batch, kind)
            assert ack["accepted"] == per_batch, ack
            await asyncio.sleep(STEADY_PAUSE_S)


async def anomaly_alerts(http: aiohttp.ClientSession, hub: RunningHub) -> list[dict[str, Any]]:
    status, page = await call(http, hub, "GET", "/api/v1/alerts?limit=100", scope="hub:read")
    assert status == 200, page
    return [alert for alert in page["data"] if alert["rule_id"].startswith("anomaly-")]


async def wait_for_alerts(
    http: aiohttp.ClientSession, hub: RunningHub, count: int = 1, timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    for _ in range(round(timeout_s / 0.1)):
        found = await anomaly_alerts(http, hub)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {count} anomaly alerts within {timeout_s} s: {found}")


async def test_a_burst_raises_one_high_alert_and_throttles_until_an_operator_lifts_it(
    hub_with: HubStarter, http_to: Any
) -> None:
    hub = await hub_with({**QUICK, "anomaly_throttle": True, "anomaly_throttle_events_per_s": 0.001})
    http = await http_to(hub)
    conn = await open_agent(hub, "agent-1")
    try:
        agent = Sender(conn)
        await agent.steady(2.0)
        assert await anomaly_alerts(http, hub) == []
        assert (await agent.batch(300))["accepted"] == 300
        for _ in range(2):  # one episode, however many intervals of it
            ack = await agent.batch(300)
            if "error" in ack:  # the burst was judged already, and the agent throttled
                assert ack["error"]["code"] == "overloaded", ack
                break
            await asyncio.sleep(0.02)
        (alert,) = await wait_for_alerts(http, hub)
        assert (alert["rule_id"], alert["severity"], alert["agent_id"]) == (
            "anomaly-burst",
            "HIGH",
            "agent-1",
        )
        assert (alert["process_id"], alert["status"], alert["threshold"]) == ("agent-1:0", "open", None)
        assert "burst" in alert["title"].lower()

        for _ in range(100):  # the throttle is set right after the alert it names is stored
            _, throttle = await call(http, hub, "GET", "/api/v1/agents/agent-1/throttle", scope="hub:read")
            if throttle["throttled"]:
                break
            await asyncio.sleep(0.05)
        ack = await agent.batch(5)
        assert ack["error"]["code"] == "overloaded"
        assert ack["error"]["retry_after_ms"] > 0
        status, throttle = await call(http, hub, "GET", "/api/v1/agents/agent-1/throttle", scope="hub:read")
        assert status == 200
        assert throttle["throttled"] is True
        assert throttle["throttled_by"] == "anomaly-detector"
        assert throttle["events_per_s"] == 0.001
        assert alert["id"] in throttle["reason"]

        # Lifting needs hub:admin, and is audited.
        status, _ = await call(http, hub, "DELETE", "/api/v1/agents/agent-1/throttle", scope="hub:write")
        assert status == 403
        assert (await agent.batch(5))["error"]["code"] == "overloaded"
        status, _ = await call(http, hub, "DELETE", "/api/v1/agents/agent-1/throttle")
        assert status == 204
        assert (await agent.batch(5))["accepted"] == 5
        status, throttle = await call(http, hub, "GET", "/api/v1/agents/agent-1/throttle", scope="hub:read")
        assert (status, throttle["throttled"], throttle["events_per_s"]) == (200, False, None)
        status, _ = await call(http, hub, "DELETE", "/api/v1/agents/agent-1/throttle")
        assert status == 404
        status, audit = await call(http, hub, "GET", "/api/v1/audit?action=lift_throttle", scope="hub:admin")
        assert status == 200
        assert [entry["status"] for entry in audit["data"]] == [404, 204]
        assert len(await anomaly_alerts(http, hub)) == 1
    finally:
        await conn.close()


async def test_a_burst_without_throttling_only_alerts(hub_with: HubStarter, http_to: Any) -> None:
    hub = await hub_with(QUICK)
    http = await http_to(hub)
    conn = await open_agent(hub, "agent-1")
    try:
        agent = Sender(conn)
        await agent.steady(2.0)
        assert (await agent.batch(500))["accepted"] == 500
        (alert,) = await wait_for_alerts(http, hub)
        assert alert["rule_id"] == "anomaly-burst"
        assert (await agent.batch(5))["accepted"] == 5
        status, throttle = await call(http, hub, "GET", "/api/v1/agents/agent-1/throttle", scope="hub:read")
        assert (status, throttle["throttled"]) == (200, False)
    finally:
        await conn.close()


async def test_a_silence_while_connected_raises_a_medium_alert(hub_with: HubStarter, http_to: Any) -> None:
    hub = await hub_with(QUICK)
    http = await http_to(hub)
    conn = await open_agent(hub, "agent-1")
    try:
        agent = Sender(conn)
        await agent.steady(2.0)
        assert await anomaly_alerts(http, hub) == []
        # Still connected (heartbeats are not events), no events for well over two intervals.
        await conn.send({"ts": time.time(), "cpu_percent": 1.0, "mem_percent": 1.0}, "heartbeat")
        (alert,) = await wait_for_alerts(http, hub)
        assert (alert["rule_id"], alert["severity"], alert["agent_id"]) == (
            "anomaly-silence",
            "MEDIUM",
            "agent-1",
        )
        await asyncio.sleep(1.0)  # one alert per episode
        assert len(await anomaly_alerts(http, hub)) == 1
    finally:
        await conn.close()


async def test_steady_traffic_raises_nothing_and_a_kind_mix_shift_is_noticed(
    hub_with: HubStarter, http_to: Any
) -> None:
    hub = await hub_with({**QUICK, "anomaly_min_events": 20})
    http = await http_to(hub)
    conn = await open_agent(hub, "agent-1")
    try:
        agent = Sender(conn)
        await agent.steady(3.0)
        assert await anomaly_alerts(http, hub) == []
        # The same rate, but all of it network connections now.
        await agent.steady(1.0, kind="net_connect")
        (alert,) = await wait_for_alerts(http, hub)
        assert (alert["rule_id"], alert["severity"]) == ("anomaly-mix", "MEDIUM")
        assert "net_connect" in alert["title"]
    finally:
        await conn.close()


async def test_an_operator_throttle_holds_across_nodes_and_restarts(
    hub_with: HubStarter, http_to: Any
) -> None:
    first = await hub_with({"anomaly_interval_s": 0.3})
    http = await http_to(first)
    status, _ = await call(http, first, "POST", "/api/v1/agents/agent-1/throttle", {"events_per_s": 0})
    assert status == 422
    status, throttle = await call(
        http, first, "POST", "/api/v1/agents/agent-1/throttle", {"events_per_s": 0.01, "reason": "noisy"}
    )
    assert status == 200, throttle
    assert (throttle["throttled"], throttle["reason"], throttle["throttled_by"]) == (True, "noisy", "tester")
    # A second node on the same database holds the agent to it too.
    second = await hub_with({"anomaly_interval_s": 0.3, "node_id": "node-b"})
    conn = await open_agent(second, "agent-1")
    try:
        ack = await conn.send({"events": make_events(1, 5)})
        assert ack["error"]["code"] == "overloaded"
        assert "throttled" in ack["error"]["message"]
        status, _ = await call(http, first, "DELETE", "/api/v1/agents/agent-1/throttle")
        assert status == 204
        for _ in range(50):  # the other node follows the store within an interval
            ack = await conn.send({"events": make_events(1, 5)})
            if "error" not in ack:
                break
            await asyncio.sleep(0.1)
        assert ack["accepted"] == 5
    finally:
        await conn.close()
