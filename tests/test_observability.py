"""Metrics scraped from a real hub and parsed as Prometheus does; logs with correlation ids and no secrets."""

from __future__ import annotations

import asyncio
import io
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.keys import USERS
from hub.observability import METRICS, JsonFormatter, TextFormatter, log_context
from tests.conftest import ConnectAgent, HubStarter, RunningHub, bearer, call, make_events
from tests.test_deliveries import LOOPBACK, WEBHOOKS, Receiver, client, ping, settled, subscribe
from tests.test_scoring import attack
from tests.test_signin import PASSWORD, Browser

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels, as Prometheus's own parser reads it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(http: aiohttp.ClientSession, hub: RunningHub) -> Samples:
    async with http.get("/api/v1/metrics", headers=bearer(hub)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What the hub logs while the test runs, formatted as `agenthub serve` writes it (JSON lines)."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield output
    root.removeHandler(handler)
    root.setLevel(level)


def log_lines(output: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.getvalue().splitlines()]


async def test_event_counters_equal_what_the_agent_sent(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    first = await agent.send({"events": make_events(1, 5)})
    bad = {"seq": 9, "ts": 1_700_000_000.0, "kind": "no_such_kind", "pid": 1}
    second = await agent.send({"events": [*make_events(4, 4), bad]})  # seq 4 and 5 again
    assert (first["accepted"], second["accepted"], second["duplicates"]) == (5, 2, 2)
    assert len(second["rejected"]) == 1

    samples = await scrape(http, hub)
    assert value(samples, "hub_events_total", outcome="accepted") == 7
    assert value(samples, "hub_events_total", outcome="duplicate") == 2
    assert value(samples, "hub_events_total", outcome="rejected") == 1
    assert value(samples, "hub_agents_connected") == 1
    assert value(samples, "hub_ack_latency_seconds_count") == 2
    assert value(samples, "hub_store_commit_size_events_count") >= 2
    assert value(samples, "hub_store_commit_size_events_sum") >= 7  # events, and the agent's presence
    assert value(samples, "hub_store_commit_latency_seconds_count") >= 2
    assert value(samples, "hub_info", version="0.1.0", node=hub.settings.node_id) == 1
    assert value(samples, "hub_push_subscribers") == 0
    assert value(samples, "hub_webhook_outbox_deliveries", state="pending") == 0
    assert value(samples, "hub_siem_queue_rows") == 0  # no SIEM configured: nothing is queued
    assert value(samples, "hub_siem_dropped_events_total") == 0

    await agent.close()
    await hub.settle()
    samples = await scrape(http, hub)
    assert value(samples, "hub_agents_connected") == 0
    assert value(samples, "hub_scored_events_total") == 7
    assert value(samples, "hub_scoring_backlog_events") == 0
    assert value(samples, "hub_scoring_lag_seconds_count") >= 1


async def test_alerts_are_counted_by_severity(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    assert (await agent.send({"events": attack()}))["accepted"] == 4
    await hub.settle()
    stored = await hub.store.list_alerts(agent_id="agent-1", severity=None, after=None, limit=50)
    raised = Counter(alert["severity"] for alert in stored.items)
    assert raised  # the attack raises alerts

    samples = await scrape(http, hub)
    for severity in ("LOW", "MEDIUM", "HIGH", "CRITICAL"):
        assert value(samples, "hub_alerts_total", severity=severity) == raised[severity]


async def test_http_requests_are_counted_by_route_template_and_status(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    for agent_id in ("ghost-1", "ghost-2", "ghost-3"):
        async with http.get(f"/api/v1/agents/{agent_id}", headers=bearer(hub)) as response:
            assert response.status == 404
    async with http.get("/api/v1/agents/ghost-1") as response:
        assert response.status == 401
    async with http.get("/no/such/path") as response:
        assert response.status == 404
    await scrape(http, hub)

    samples = await scrape(http, hub)
    route = "/api/v1/agents/{agent_id}"
    assert value(samples, "hub_http_requests_total", method="GET", route=route, status="404") == 3
    assert value(samples, "hub_http_requests_total", method="GET", route=route, status="401") == 1
    assert value(samples, "hub_http_request_duration_seconds_count", method="GET", route=route) == 4
    assert value(samples, "hub_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "hub_http_requests_total", method="GET", route="/api/v1/metrics", status="200") == 1
    routes = {dict(labels).get("route") for name, labels in samples if name == "hub_http_requests_total"}
    assert not any("ghost" in str(route) for route in routes)  # templates only: bounded label values


async def test_a_websocket_is_counted_but_its_session_is_no_request_time(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.close()
    for _ in range(50):  # the request ends a moment after the socket closes
        samples = await scrape(http, hub)
        if (
            "hub_http_requests_total",
            frozenset({"method": "GET", "route": "/socket.io/", "status": "101"}.items()),
        ) in samples:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "hub_http_requests_total", method="GET", route="/socket.io/", status="101") == 1
    samples = await scrape(http, hub)  # the scrapes before it are timed by now
    durations = {
        dict(labels).get("route") for name, labels in samples if name.startswith("hub_http_request_duration")
    }
    assert "/socket.io/" not in durations
    assert "/api/v1/metrics" in durations


async def test_webhook_deliveries_are_counted_by_outcome_and_the_outbox_by_state(
    hub_with: HubStarter,
) -> None:
    hub = await hub_with({
        "webhook_allow_http": True, "webhook_allow": LOOPBACK, "webhook_max_attempts": 3,
        "webhook_retry_base_s": 0.05, "webhook_retry_max_s": 0.1, "webhook_poll_interval_s": 0.05,
    })  # fmt: skip
    receiver = Receiver(statuses=[500] * 3)
    await receiver.start()
    try:
        async with client(hub) as api:
            webhook_id = await subscribe(api, hub, receiver)
            sent = await ping(api, hub, webhook_id)
            await settled(api, hub, webhook_id, "dead", 1)
            dead = await scrape(api, hub)
            redeliver = f"{WEBHOOKS}/{webhook_id}/deliveries/{sent['id']}:redeliver"
            assert (await call(api, hub, "POST", redeliver))[0] == 200
            await settled(api, hub, webhook_id, "delivered", 1)
            delivered = await scrape(api, hub)
    finally:
        await receiver.stop()
    assert value(dead, "hub_webhook_deliveries_total", outcome="retrying") == 2
    assert value(dead, "hub_webhook_deliveries_total", outcome="dead") == 1
    assert value(dead, "hub_webhook_outbox_deliveries", state="dead") == 1
    assert value(delivered, "hub_webhook_deliveries_total", outcome="delivered") == 1
    assert value(delivered, "hub_webhook_outbox_deliveries", state="dead") == 0
    assert value(delivered, "hub_webhook_outbox_deliveries", state="pending") == 0


async def test_metrics_need_a_token_on_the_main_listener(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    async with http.get("/api/v1/metrics") as response:
        assert response.status == 401
    async with http.get("/api/v1/metrics", headers=bearer(hub, "hub:read")) as response:
        assert response.status == 200
    accept = {"Accept": "application/openmetrics-text; version=1.0.0", **bearer(hub)}
    async with http.get("/api/v1/metrics", headers=accept) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_the_separate_listener_serves_metrics_without_a_token(hub_with: HubStarter) -> None:
    hub = await hub_with({"metrics_listen": "127.0.0.1:0"})
    runner = hub.app[METRICS].listener
    assert runner is not None
    port = runner.addresses[0][1]
    async with (
        aiohttp.ClientSession() as plain,
        plain.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        samples = parse(await response.text())
    assert value(samples, "hub_events_total", outcome="accepted") == 0


async def test_a_failed_request_logs_the_id_of_its_problem(
    hub: RunningHub, http: aiohttp.ClientSession, log_output: io.StringIO
) -> None:
    async with http.get("/api/v1/agents/ghost", headers=bearer(hub)) as response:
        assert response.status == 404
        problem = await response.json(content_type="application/problem+json")
        generated = response.headers["X-Request-ID"]
    assert problem["correlation_id"] == generated == response.headers["X-Correlation-ID"]

    mine = "client-req.42:retry-1"
    own = {"X-Request-ID": mine, **bearer(hub)}
    async with http.get("/api/v1/agents/ghost", headers=own) as response:
        assert response.headers["X-Request-ID"] == mine
        assert (await response.json(content_type=None))["correlation_id"] == mine
    for insane in ("has spaces", "x" * 129, "new\\nline"):
        async with http.get("/api/v1/agents/ghost", headers={"X-Request-ID": insane}) as response:
            assert response.headers["X-Request-ID"] != insane

    lines = [line for line in log_lines(log_output) if line["logger"] == "hub.http"]
    failed = [line for line in lines if line.get("request_id") == generated]
    assert len(failed) == 1
    assert failed[0] | {"ts": None, "duration_ms": None} == {
        "ts": None, "level": "INFO", "logger": "hub.http", "request_id": generated,
        "message": failed[0]["message"], "method": "GET", "path": "/api/v1/agents/ghost",
        "route": "/api/v1/agents/{agent_id}", "status": 404, "duration_ms": None,
    }  # fmt: skip
    assert any(line.get("request_id") == mine and line["status"] == 404 for line in lines)


async def test_socket_events_log_their_agent_and_socket(
    hub: RunningHub, connect_agent: ConnectAgent, log_output: io.StringIO
) -> None:
    agent = await connect_agent("agent-1")
    await agent.close()
    for _ in range(500):  # the hub learns of the close a moment later
        if "agent agent-1 disconnected" in log_output.getvalue():
            break
        await asyncio.sleep(0.01)
    lines = log_lines(log_output)
    connected = next(line for line in lines if line["message"].startswith("agent agent-1 connected"))
    assert connected["agent_id"] == "agent-1"
    assert connected["sid"] in connected["message"]
    disconnected = next(line for line in lines if line["message"].startswith("agent agent-1 disconnected"))
    assert (disconnected["agent_id"], disconnected["sid"]) == ("agent-1", connected["sid"])


async def test_tokens_cookies_and_passwords_never_reach_the_log(
    hub: RunningHub, http: aiohttp.ClientSession, log_output: io.StringIO
) -> None:
    await hub.app[USERS].add("alice", role="operator", password=PASSWORD)
    browser = Browser(hub.url, hub.certs / "ca.pem")
    wrong_password = "not-the-password-" + "q" * 20
    try:
        assert (await browser.sign_in("alice", wrong_password)).status == 401
        assert (await browser.sign_in("alice", PASSWORD)).status == 303
        session = next(cookie.value for cookie in browser.http.cookie_jar if "session" in cookie.key)
        status, _ = await browser.api("POST", "/api/v1/alerts/1:acknowledge", body={})
        assert status == 403  # a cookie write without the session's CSRF token
    finally:
        await browser.http.close()

    token = hub.token("hub:admin")
    forged = jwt.encode({"sub": "x", "scope": "hub:admin"}, "forged-secret-" + "f" * 40, algorithm="HS256")
    for credential in (token, forged):
        async with http.get("/api/v1/agents/ghost", headers={"Authorization": f"Bearer {credential}"}) as r:
            assert r.status in (401, 404)
    async with http.get(
        "/ws/live", params={"access_token": token}, headers={"Origin": "https://evil.example"}
    ) as response:
        assert response.status == 403

    text = log_output.getvalue()
    assert "hub.http" in text  # the failures were logged
    secrets = [token, forged, session, PASSWORD, wrong_password]
    assert hub.settings.jwt_secret is not None
    secrets.append(hub.settings.jwt_secret.get_secret_value())
    leaked = [secret[:12] for secret in secrets if secret in text]
    assert not leaked, f"secrets in the log: {leaked}"


def test_the_formatters_mask_token_like_strings_and_add_the_context() -> None:
    token = jwt.encode({"sub": "x"}, "k" * 40, algorithm="HS256")
    record = logging.LogRecord(
        "hub.x", logging.WARNING, __file__, 1, "saw %s and %s", (f"Bearer {token}", "password=hunter2"), None
    )
    with log_context(request_id="r-1", agent_id="agent-9"):
        line = orjson.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    assert line["message"] == "saw Bearer [redacted] and password=[redacted]"
    assert (line["request_id"], line["agent_id"], line["level"]) == ("r-1", "agent-9", "WARNING")
    assert token not in text
    assert "hunter2" not in text
    assert text.endswith("[request_id=r-1 agent_id=agent-9]")
