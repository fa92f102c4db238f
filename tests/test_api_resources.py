"""API resources over real HTTP: events, processes and scores, alerts, recalculation jobs."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.config import Settings, default_rule_files
from tests.conftest import ConnectAgent, RunningHub, bearer, client_ssl, make_events, open_agent, start_hub
from tests.test_scoring import T0, attack, next_of


async def get(http: aiohttp.ClientSession, hub: RunningHub, path: str, **params: Any) -> Any:
    async with http.get(path, params={k: str(v) for k, v in params.items()}, headers=bearer(hub)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_events_filter_by_agent_kind_pid_and_time(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    first, second = await connect_agent("agent-1"), await connect_agent("agent-2")
    await first.send({"events": make_events(1, 10, pid=10) + make_events(11, 5, pid=11, kind="file_write")})
    await second.send({"events": make_events(1, 3, pid=10)})
    assert len((await get(http, hub, "/api/v1/events", limit=100))["data"]) == 18
    only = (await get(http, hub, "/api/v1/events", agent_id="agent-1", kind="file_write"))["data"]
    assert [(e["agent_id"], e["seq"], e["kind"]) for e in only] == [
        ("agent-1", s, "file_write") for s in range(11, 16)
    ]
    assert {e["pid"] for e in (await get(http, hub, "/api/v1/events", pid=11))["data"]} == {11}
    window = await get(
        http, hub, "/api/v1/events", agent_id="agent-1", since=1_700_000_000.003, until=1_700_000_000.006
    )
    assert [e["seq"] for e in window["data"]] == [3, 4, 5]
    event = only[0]
    assert event["received_at"] > 0
    assert event["path"] == "/tmp/f11"


async def test_scores_and_processes_get_with_their_explanation(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.send({"events": attack()})
    await hub.settle()
    top = (await get(http, hub, "/api/v1/scores", risk_min=80))["data"][0]
    key = top["process_key"]
    score = await get(http, hub, f"/api/v1/scores/{key}")
    assert score == top
    assert score["explanation"][0]["rule_id"]
    process = await get(http, hub, f"/api/v1/processes/{key}")
    assert process["risk_score"] == score["risk_score"]
    assert process["comm"] == "sh"
    assert process["ppid"] == 100
    listed = await get(http, hub, "/api/v1/processes", agent_id="agent-1", live=True)
    assert key in {p["process_key"] for p in listed["data"]}
    async with http.get("/api/v1/scores/agent-1:999:0.000000", headers=bearer(hub)) as response:
        assert response.status == 404


async def test_alerts_are_acknowledged_then_resolved_and_pushed(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.send({"events": attack()})
    await hub.settle()
    alert = (await get(http, hub, "/api/v1/alerts", status="open"))["data"][0]
    writer = bearer(hub, "hub:write")
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
        ) as session,
        session.ws_connect(f"{hub.url}/ws/live", headers=bearer(hub)) as ws,
    ):
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        async with http.post(
            f"/api/v1/alerts/{alert['id']}:acknowledge", json={"note": "looking"}, headers=writer
        ) as response:
            assert response.status == 200
            acked = await response.json()
        assert (acked["status"], acked["acknowledged_by"], acked["note"]) == (
            "acknowledged",
            "tester",
            "looking",
        )
        pushed = await next_of(ws, "alert")  # other pushes (stats) may come first
        assert pushed["status"] == "acknowledged"
    async with http.post(f"/api/v1/alerts/{alert['id']}:resolve", headers=writer) as response:
        resolved = await response.json()
    assert (resolved["status"], resolved["note"]) == ("resolved", "looking")  # no new note: kept
    async with http.post(f"/api/v1/alerts/{alert['id']}:acknowledge", headers=writer) as response:
        assert response.status == 409
        assert "resolved" in (await response.json())["detail"]
    assert (await get(http, hub, f"/api/v1/alerts/{alert['id']}"))["status"] == "resolved"
    assert alert["id"] not in {
        a["id"] for a in (await get(http, hub, "/api/v1/alerts", status="open"))["data"]
    }
    async with http.post("/api/v1/alerts/999999:resolve", headers=writer) as response:
        assert response.status == 404
    async with http.get("/api/v1/alerts/99999999999999999999", headers=writer) as response:
        assert response.status == 422


# recalculation -----------------------------------------------------------------------------


@pytest.fixture
async def rules_hub(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[RunningHub, Path]]:
    """A hub whose rule file the test may edit on disk."""
    rule_file = tmp_path / "rules.toml"
    shutil.copy(default_rule_files()[0], rule_file)
    runner, hub = await start_hub(settings.model_copy(update={"rule_files": [rule_file]}))
    yield hub, rule_file
    await runner.cleanup()


async def run_job(http: aiohttp.ClientSession, hub: RunningHub) -> dict[str, Any]:
    async with http.post("/api/v1/scores:recalculate", headers=bearer(hub, "hub:admin")) as response:
        assert response.status == 202, await response.text()
        job = await response.json()
        location = response.headers["Location"]
    assert location == f"/api/v1/jobs/{job['id']}"
    for _ in range(500):
        job = await get(http, hub, location)
        if job["state"] != "running":
            return job
        await asyncio.sleep(0.02)
    raise AssertionError("the recalculation did not finish")


async def scores_of(http: aiohttp.ClientSession, hub: RunningHub) -> dict[str, tuple[float, Any]]:
    items = (await get(http, hub, "/api/v1/scores", limit=500, risk_min=0.01))["data"]
    return {item["process_key"]: (item["risk_score"], item["explanation"]) for item in items}


async def test_recalculation_job_matches_live_scores_then_applies_edited_rules(
    rules_hub: tuple[RunningHub, Path],
) -> None:
    hub, rule_file = rules_hub
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
        agent = await open_agent(hub, "agent-1")
        try:
            await agent.send({"events": attack()})
            await hub.settle()
            live = await scores_of(http, hub)
            job = await run_job(http, hub)
            assert job["state"] == "succeeded", job
            assert job["progress"] == len(attack())
            assert await scores_of(http, hub) == live

            # An operator halves a rule's weight on disk: the job applies it to stored events.
            text = rule_file.read_text()
            assert 'weight = 45\ntactics = ["TA0001", "TA0002", "TA0003"]' in text
            rule_file.write_text(
                text.replace('weight = 45\ntactics = ["TA0001"', 'weight = 5\ntactics = ["TA0001"', 1)
            )
            assert (await run_job(http, hub))["state"] == "succeeded"
            lowered = await scores_of(http, hub)
            assert max(s for s, _ in lowered.values()) < max(s for s, _ in live.values())

            # Live scoring goes on with the new rules: the same attack again scores as recalculated.
            assert not (await agent.send({"events": attack(start_seq=100, t0=T0 + 10)}))["rejected"]
            await hub.settle()
            again = await scores_of(http, hub)
            new_keys = set(again) - set(lowered)
            assert sorted(again[k][0] for k in new_keys) == sorted(lowered[k][0] for k in lowered)

            rule_file.write_text("[[rule]]\nid = 'broken'\n")
            failed = await run_job(http, hub)
            assert failed["state"] == "failed"
            assert "rules.toml" in failed["error"]
        finally:
            await agent.close()
