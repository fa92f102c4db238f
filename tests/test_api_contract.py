"""What every API route shares: problems, cursors, idempotency, rate limits, OpenAPI."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from hub.api import TABLES
from hub.config import Settings
from hub.problems import problem_middleware
from hub.tokens import create_token
from tests.conftest import (
    ConnectAgent,
    HubStarter,
    RunningHub,
    bearer,
    client_ssl,
    make_events,
    open_agent,
    start_hub,
    stored_bytes,
)
from tests.test_scoring import attack


async def problem_of(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert {"type", "title", "status", "detail", "instance", "correlation_id"} <= set(body)
    assert body["status"] == status
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    return body


# problems ----------------------------------------------------------------------------------


async def test_unknown_route_wrong_method_and_media_type_are_problems(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    headers = bearer(hub, "hub:admin")
    async with http.get("/api/v1/nothing-here", headers=headers) as response:
        body = await problem_of(response, 404)
    assert body["instance"] == "/api/v1/nothing-here"
    async with http.delete("/api/v1/agents", headers=headers) as response:
        await problem_of(response, 405)
        assert "GET" in response.headers["Allow"]
    async with http.post(
        "/api/v1/alerts/1:resolve", data="note=x", headers={**headers, "Content-Type": "text/plain"}
    ) as response:
        body = await problem_of(response, 415)
    assert "application/json" in body["detail"]


async def test_an_oversize_body_is_a_413_problem(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    big = json.dumps({"note": "x" * (hub.settings.api_max_body_bytes + 1)})
    async with http.post(
        "/api/v1/alerts/1:resolve",
        data=io.BytesIO(big.encode()),
        headers={**bearer(hub, "hub:write"), "Content-Type": "application/json"},
    ) as response:
        body = await problem_of(response, 413)
    assert str(hub.settings.api_max_body_bytes) in body["detail"]


async def test_invalid_json_and_invalid_fields_are_422_problems_naming_them(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    headers = {**bearer(hub, "hub:write"), "Content-Type": "application/json"}
    async with http.post("/api/v1/alerts/1:resolve", data="{not json", headers=headers) as response:
        body = await problem_of(response, 422)
    assert "not valid JSON" in body["detail"]
    async with http.post(
        "/api/v1/alerts/1:resolve", json={"note": 5, "extra": 1}, headers=headers
    ) as response:
        body = await problem_of(response, 422)
    assert {error["location"] for error in body["errors"]} == {"body.note", "body.extra"}


async def test_an_unexpected_error_is_a_500_problem_without_internals() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("SELECT secret FROM somewhere")

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/api/v1/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/api/v1/broken") as response,
        ):
            body = await problem_of(response, 500)
    finally:
        await runner.cleanup()
    assert "SELECT" not in json.dumps(body)
    assert body["correlation_id"] in body["detail"]


# cursors -----------------------------------------------------------------------------------


async def test_a_cursor_is_refused_when_tampered_or_reused_with_other_filters(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.send({"events": make_events(1, 5)})
    headers = bearer(hub)
    async with http.get("/api/v1/events", params={"limit": "2"}, headers=headers) as response:
        cursor = (await response.json())["pagination"]["cursor"]
    assert cursor
    tampered = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")
    for params in (
        {"cursor": tampered},
        {"cursor": "!!garbage!!"},
        {"cursor": cursor, "kind": "file_open"},  # another filter: another list
    ):
        async with http.get("/api/v1/events", params=params, headers=headers) as response:
            body = await problem_of(response, 400)
        assert "cursor" in body["detail"]
    async with http.get("/api/v1/alerts", params={"cursor": cursor}, headers=headers) as response:
        await problem_of(response, 400)
    async with http.get(
        "/api/v1/events", params={"cursor": cursor, "limit": "10"}, headers=headers
    ) as response:
        assert [e["seq"] for e in (await response.json())["data"]] == [3, 4, 5]


async def test_paging_while_events_arrive_skips_and_repeats_nothing(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    first, second = await connect_agent("agent-1"), await connect_agent("agent-2")
    await first.send({"events": make_events(1, 60)})
    await second.send({"events": make_events(1, 60)})
    before = {("agent-1", seq) for seq in range(1, 61)} | {("agent-2", seq) for seq in range(1, 61)}
    seen: list[tuple[str, int]] = []
    cursor, next_seq = None, 61
    while True:
        params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
        async with http.get("/api/v1/events", params=params, headers=bearer(hub)) as response:
            page = await response.json()
        seen += [(event["agent_id"], event["seq"]) for event in page["data"]]
        # New rows land between pages, for both agents.
        for conn in (first, second):
            await conn.send({"events": make_events(next_seq, 3)})
        next_seq += 3
        cursor = page["pagination"]["cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "an event was listed twice"
    assert before <= set(seen), "an event stored before paging began was skipped"


# idempotency -------------------------------------------------------------------------------


async def alert_id(hub: RunningHub, connect_agent: ConnectAgent) -> str:
    agent = await connect_agent("agent-1")
    await agent.send({"events": attack()})
    await hub.settle()
    page = await hub.store.list_alerts(agent_id="agent-1", severity=None, after=None, limit=1)
    return str(page.items[0]["id"])


async def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_body(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    alert = await alert_id(hub, connect_agent)
    headers = {**bearer(hub, "hub:write"), "Idempotency-Key": "resolve-1"}
    url = f"/api/v1/alerts/{alert}:resolve"
    async with http.post(url, json={"note": "benign"}, headers=headers) as response:
        assert response.status == 200
        first = await response.json()
        assert "Idempotent-Replayed" not in response.headers
    async with http.post(url, json={"note": "benign"}, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Idempotent-Replayed"] == "true"
        assert await response.json() == first
    async with http.post(url, json={"note": "something else"}, headers=headers) as response:
        body = await problem_of(response, 422)
    assert "resolve-1" in body["detail"]
    async with http.post(url, json={}, headers={**headers, "Idempotency-Key": "bad key"}) as response:
        await problem_of(response, 422)


async def test_idempotent_replays_survive_a_restart(settings: Settings) -> None:
    headers: dict[str, str] = {}
    answers = []
    for _ in range(2):  # the same data directory, a new hub process state each time
        runner, hub = await start_hub(settings)
        try:
            if not headers:
                conn = await open_agent(hub, "agent-1")
                await conn.send({"events": attack()})
                await conn.close()
                await hub.settle()
                page = await hub.store.list_alerts(agent_id="agent-1", severity=None, after=None, limit=1)
                url = f"/api/v1/alerts/{page.items[0]['id']}:acknowledge"
                headers = {**bearer(hub, "hub:write"), "Idempotency-Key": "ack-after-restart"}
            connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
            async with (
                aiohttp.ClientSession(base_url=hub.url, connector=connector) as http,
                http.post(url, json={"note": "on it"}, headers=headers) as response,
            ):
                assert response.status == 200
                answers.append((response.headers.get("Idempotent-Replayed"), await response.json()))
        finally:
            await runner.cleanup()
    assert answers[0][0] is None
    assert answers[1] == ("true", answers[0][1])


async def test_idempotency_keys_expire_after_their_ttl(settings: Settings) -> None:
    runner, hub = await start_hub(settings.model_copy(update={"idempotency_ttl_s": 0.5}))
    try:
        connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
        async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
            headers = {**bearer(hub, "hub:admin"), "Idempotency-Key": "short-lived"}
            url = "/api/v1/scores:recalculate"
            async with http.post(url, headers=headers) as response:
                first = await response.json()
            async with http.post(url, headers=headers) as response:
                assert response.headers["Location"] == f"/api/v1/jobs/{first['id']}"
                assert await response.json() == first
            await asyncio.sleep(0.6)
            async with http.post(url, headers=headers) as response:
                assert response.status == 202
                assert "Idempotent-Replayed" not in response.headers
                assert (await response.json())["id"] != first["id"]
    finally:
        await runner.cleanup()


async def test_answers_carrying_secrets_are_never_kept_for_replay(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    headers = {**bearer(hub, "hub:admin"), "Idempotency-Key": "secret-once"}
    async with http.post("/api/v1/agents/sensor-9/signing-secret", headers=headers) as response:
        assert response.status == 201
        assert response.headers["Cache-Control"] == "no-store"
        secret = (await response.json())["secret"]
    async with http.post("/api/v1/agents/sensor-9/signing-secret", headers=headers) as response:
        body = await problem_of(response, 409)
    assert "carried a secret" in body["detail"]
    assert await hub.store.get_agent_secret("sensor-9") == secret  # done once, not twice
    database = await stored_bytes(hub.settings)
    assert database.count(secret.encode()) == 1  # only where the hub needs it, not in the replay table


async def test_one_key_sent_at_once_many_times_does_the_work_once(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    headers = {**bearer(hub, "hub:admin"), "Idempotency-Key": "burst"}

    async def create() -> int:
        body = {"url": "https://93.184.216.34/hook", "event_types": ["alert_raised"]}
        async with http.post("/api/v1/webhooks", json=body, headers=headers) as response:
            return response.status

    statuses = await asyncio.gather(*(create() for _ in range(20)))
    assert statuses.count(201) == 1
    assert set(statuses) <= {201, 409}
    async with http.get("/api/v1/webhooks", headers=headers) as response:
        assert len((await response.json())["data"]) == 1


# rate limits -------------------------------------------------------------------------------


@pytest.fixture
async def limited_hub(hub_with: HubStarter) -> RunningHub:
    return await hub_with({"rate_limit_burst": 3, "rate_limit_per_s": 0.5})


async def test_rate_limit_is_per_principal_with_headers_and_retry_after(limited_hub: RunningHub) -> None:
    hub = limited_hub
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
        headers = bearer(hub)
        remaining = []
        for _ in range(3):
            async with http.get("/api/v1/agents", headers=headers) as response:
                assert response.status == 200
                assert response.headers["X-RateLimit-Limit"] == "3"
                assert int(response.headers["X-RateLimit-Reset"]) > 0
                remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        assert remaining == [2, 1, 0]
        async with http.get("/api/v1/agents", headers=headers) as response:
            body = await problem_of(response, 429)
            assert int(response.headers["Retry-After"]) >= 1
            assert response.headers["X-RateLimit-Remaining"] == "0"
        assert "rate limit" in body["detail"]
        someone_else = create_token(hub.settings, scopes=["hub:read"], subject="someone-else")
        async with http.get(
            "/api/v1/agents", headers={"Authorization": f"Bearer {someone_else}"}
        ) as response:
            assert response.status == 200


@pytest.fixture
async def address_limited_hub(hub_with: HubStarter) -> RunningHub:
    return await hub_with({"rate_limit_address_burst": 3, "rate_limit_address_per_s": 0.5})


async def test_requests_refused_before_authentication_are_rate_limited_by_address(
    address_limited_hub: RunningHub,
) -> None:
    hub = address_limited_hub
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
        statuses = []
        for _ in range(4):
            async with http.get(
                "/api/v1/agents", headers={"Authorization": "Bearer not-a-token"}
            ) as response:
                statuses.append(response.status)
                assert response.headers["X-RateLimit-Limit"] == "3"
        assert statuses == [401, 401, 401, 429]


# OpenAPI -----------------------------------------------------------------------------------


async def test_the_openapi_document_describes_every_route_and_the_docs_page_works_offline(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    async with http.get("/api/v1/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    declared = {(r.method.lower(), r.path) for table in TABLES for r in table.routes}
    described = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert declared == described
    resolve = document["paths"]["/api/v1/alerts/{alert_id}:resolve"]["post"]
    assert resolve["x-required-scope"] == "hub:write"
    assert {"401", "403", "404", "413", "415", "422", "429", "500"} <= set(resolve["responses"])
    async with http.get("/api/v1/docs") as response:
        assert response.status == 200
        page = await response.text()
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page
    assert "https://" not in page  # nothing fetched from the internet
    async with http.get("/static/swagger-ui/swagger-ui-bundle.js") as response:
        assert response.status == 200


async def test_lists_answer_in_one_shape(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    lists = [
        route.path
        for table in TABLES
        for route in table.routes
        if route.method == "GET" and "PageOf" in str(route.response) and route.path_params is None
    ]
    assert len(lists) >= 5
    results = await asyncio.gather(*(_get_json(http, path, bearer(hub, "hub:admin")) for path in lists))
    for body in results:
        assert set(body) == {"data", "pagination"}
        assert set(body["pagination"]) == {"cursor", "has_more"}


async def _get_json(http: aiohttp.ClientSession, path: str, headers: dict[str, str]) -> Any:
    async with http.get(path, headers=headers) as response:
        assert response.status == 200, path
        return await response.json()
