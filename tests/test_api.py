"""The HTTP API over real TLS: auth refused by default, list shapes, cursors, problems."""

from __future__ import annotations

import sqlite3
import time

import aiohttp
import jwt
import pytest

from hub.store.sqlite import SqliteConn, SqliteStore
from tests.conftest import ConnectAgent, RunningHub
from tests.test_scoring import attack


async def test_health_answers_without_a_token(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["version"]


@pytest.mark.parametrize("path", ["/api/v1/agents", "/api/v1/scores", "/api/v1/alerts", "/api/v1/stats"])
async def test_every_list_refuses_without_a_token(
    hub: RunningHub, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(path) as response:
        assert response.status == 401
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
    assert "bearer token is required" in body["detail"]


async def test_forged_expired_and_unsigned_tokens_are_refused(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    now = int(time.time())
    claims = {
        "sub": "x",
        "scope": "hub:admin",
        "iat": now,
        "exp": now + 60,
        "iss": "agenthub",
        "aud": "agenthub-api",
        "jti": "1",
    }
    forged = jwt.encode(claims, "not-the-hub-secret-" + "y" * 40, algorithm="HS256")
    unsigned = jwt.encode(claims, key="", algorithm="none")
    expired = jwt.encode(
        {**claims, "exp": now - 3600, "iat": now - 7200},
        hub.settings.jwt_secret.get_secret_value(),
        algorithm="HS256",
    )
    for token, words in ((forged, "not valid"), (unsigned, "not valid"), (expired, "expired")):
        async with http.get("/api/v1/agents", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 401
            assert words in (await response.json())["detail"]


async def test_unknown_api_route_is_a_404_problem(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    async with http.get(
        "/api/v1/nothing-here", headers={"Authorization": f"Bearer {hub.token()}"}
    ) as response:
        assert response.status == 404
        assert response.headers["Content-Type"].startswith("application/problem+json")


async def test_agents_list_pages_with_a_cursor(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    for agent_id in ("agent-1", "agent-2", "agent-3"):
        await connect_agent(agent_id)
    headers = {"Authorization": f"Bearer {hub.token('hub:read')}"}
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        async with http.get("/api/v1/agents", params=params, headers=headers) as response:
            assert response.status == 200
            body = await response.json()
        seen += [item["agent_id"] for item in body["data"]]
        assert set(body["pagination"]) == {"cursor", "has_more"}
        cursor = body["pagination"]["cursor"]
        if not body["pagination"]["has_more"]:
            assert cursor is None
            break
    assert seen == ["agent-1", "agent-2", "agent-3"]
    async with http.get("/api/v1/agents", params={"status": "online"}, headers=headers) as response:
        assert {a["status"] for a in (await response.json())["data"]} == {"online"}
    async with http.get("/api/v1/agents/agent-2", headers=headers) as response:
        agent = await response.json()
    assert agent["status"] == "online"
    assert agent["risk"] == 0.0
    assert agent["node"] == hub.settings.node_id


async def test_scores_and_alerts_carry_the_fields_clients_expect(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.send({"events": attack()})
    await hub.settle()
    headers = {"Authorization": f"Bearer {hub.token()}"}
    async with http.get("/api/v1/scores", params={"risk_min": "80"}, headers=headers) as response:
        scores = (await response.json())["data"]
    assert len(scores) == 1
    score = scores[0]
    assert score["process_id"] == "agent-1:200"
    assert score["agent_id"] == "agent-1"
    assert score["pid"] == 200
    assert score["risk_score"] > 80
    assert score["explanation"][0]["contribution"] > 0
    async with http.get("/api/v1/alerts", params={"severity": "HIGH"}, headers=headers) as response:
        alerts = (await response.json())["data"]
    assert alerts
    for alert in alerts:
        assert {"agent_id", "pid", "severity", "rule_id", "mitre"} <= set(alert)
        assert alert["severity"] == "HIGH"
    async with http.get("/api/v1/agents/agent-1", headers=headers) as response:
        assert (await response.json())["risk"] > 80


@pytest.mark.parametrize(
    ("params", "location"),
    [
        ({"limit": "0"}, "query.limit"),
        ({"limit": "lots"}, "query.limit"),
        ({"risk_min": "high"}, "query.risk_min"),
        ({"agent_id": "../../etc/x"}, "query.agent_id"),
        ({"colour": "red"}, "query.colour"),
    ],
)
async def test_bad_query_parameters_are_named(
    hub: RunningHub, http: aiohttp.ClientSession, params: dict[str, str], location: str
) -> None:
    async with http.get(
        "/api/v1/scores", params=params, headers={"Authorization": f"Bearer {hub.token()}"}
    ) as response:
        assert response.status == 422
        body = await response.json()
    assert body["detail"].startswith(location)
    assert body["errors"][0]["location"] == location
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]


async def test_health_is_503_when_the_database_does_not_answer(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    store = hub.store
    # What health reads with (SQLite's reader connection, PostgreSQL's reader pool): closed, as a
    # lost disk or database would leave it.
    if isinstance(store, SqliteStore):
        name = "_reader"
        closed = sqlite3.connect(":memory:")
        closed.close()
        broken = SqliteConn(closed)
    else:
        name = "_readers"
        broken = await store._pool(1)
        await broken.close()
    reader = getattr(store, name)
    setattr(store, name, broken)
    try:
        async with http.get("/api/v1/health") as response:
            assert response.status == 503
            assert response.headers["Retry-After"]
            body = await response.json()
        assert body["status"] == 503
        assert "database unreachable" in body["detail"]
    finally:
        setattr(store, name, reader)
