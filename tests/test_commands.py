"""Agent commands over real TLS: delivery and acks, offline queues, expiry, idempotency, push, scopes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from agent_client.commands import execute
from hub.config import Settings
from tests.conftest import AgentConn, ConnectAgent, HubStarter, RunningHub, client_ssl, open_agent, start_hub

SEND = "/api/v1/agents/{agent_id}/commands"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Sweep expired commands often, so short TTLs end within a test's patience."""
    return settings.model_copy(update={"command_sweep_interval_s": 0.05})


class Host:
    """The agent side of `agent_client.commands`: what its allow-listed commands may see."""

    def status(self) -> dict[str, Any]:
        return {"spool_depth": 0}

    def flush(self) -> int:
        return 0


class Agent:
    """A `command` handler running the real agent allow-list; `hold` delays every ack until set."""

    def __init__(self, *, hold: bool = False) -> None:
        self.received: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def on_command(self, data: dict[str, Any]) -> dict[str, Any]:
        self.received.append(data)
        await self.release.wait()
        return await execute(Host(), data)

    async def connect(self, connect_agent: ConnectAgent, agent_id: str = "agent-1") -> AgentConn:
        return await connect_agent(agent_id, handlers={"command": self.on_command})


def auth(hub: RunningHub, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.token(*scopes)}"}


async def send(
    hub: RunningHub, http: aiohttp.ClientSession, body: dict[str, Any], *, agent_id: str = "agent-1"
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        SEND.format(agent_id=agent_id), json=body, headers=auth(hub, "hub:write")
    ) as response:
        return response.status, await response.json()


async def get(hub: RunningHub, http: aiohttp.ClientSession, command_id: str) -> dict[str, Any]:
    async with http.get(f"/api/v1/commands/{command_id}", headers=auth(hub)) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def until(hub: RunningHub, http: aiohttp.ClientSession, command_id: str, state: str) -> dict[str, Any]:
    """Poll the command until it is in `state` (generous bound: 10 s)."""
    for _ in range(200):
        view = await get(hub, http, command_id)
        if view["state"] == state:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"command {command_id} stayed {view['state']}, never {state}")


def operator(hub: RunningHub) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=hub.url, connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    )


async def known_but_offline(connect_agent: ConnectAgent, agent_id: str = "agent-1") -> None:
    """Make the hub know `agent_id` (commands go only to agents it has seen), then disconnect it."""
    conn = await connect_agent(agent_id)
    await conn.close()


async def test_online_agent_completes_within_the_wait(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = Agent()
    await agent.connect(connect_agent)
    async with http.post(
        SEND.format(agent_id="agent-1"), json={"name": "ping", "wait_s": 10}, headers=auth(hub, "hub:write")
    ) as response:
        assert response.status == 201
        view = await response.json()
        assert response.headers["Location"] == f"/api/v1/commands/{view['id']}"
    assert view["state"] == "completed"
    assert view["result"]["pong"] is True
    assert view["error"] is None
    assert view["agent_id"] == "agent-1"
    assert view["created_by"] == "tester"
    assert view["created_at"] <= view["delivered_at"] <= view["completed_at"] < view["expires_at"]
    assert agent.received == [{"id": view["id"], "name": "ping", "args": {}}]
    assert await get(hub, http, view["id"]) == view


async def test_a_command_the_agent_refuses_fails(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await Agent().connect(connect_agent)
    status, view = await send(hub, http, {"name": "reboot", "args": {"now": True}})
    assert status == 201
    assert view["state"] == "failed"
    assert "allow-list" in view["error"]
    assert view["completed_at"] is not None


async def test_a_malformed_ack_fails_the_command(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    async def wrong_ack(data: dict[str, Any]) -> dict[str, Any]:
        return {"id": data["id"], "ok": "yes"}

    await connect_agent("agent-1", handlers={"command": wrong_ack})
    status, view = await send(hub, http, {"name": "ping"})
    assert (status, view["state"]) == (201, "failed")
    assert view["error"].startswith("malformed ack from the agent: ok:")


async def test_offline_agent_gets_its_queued_commands_after_hello_in_order(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await known_but_offline(connect_agent)
    first = (await send(hub, http, {"name": "ping", "wait_s": 0}))[1]
    second = (await send(hub, http, {"name": "status", "wait_s": 0}))[1]
    assert (first["state"], first["delivered_at"]) == ("queued", None)
    assert (await get(hub, http, second["id"]))["state"] == "queued"

    agent = Agent()
    conn = await agent.connect(connect_agent)
    done = [await until(hub, http, command["id"], "completed") for command in (first, second)]
    assert [command["name"] for command in agent.received] == ["ping", "status"]
    hello = await conn.hello
    assert all(command["delivered_at"] >= hello["server_time"] for command in done)
    assert done[1]["result"] == {"spool_depth": 0}


async def test_queued_command_expires_and_is_never_sent(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await known_but_offline(connect_agent)
    status, view = await send(hub, http, {"name": "flush_spool", "ttl_s": 0.2, "wait_s": 0})
    assert (status, view["state"]) == (201, "queued")
    expired = await until(hub, http, view["id"], "expired")
    assert "did not connect" in expired["error"]
    assert expired["delivered_at"] is None

    agent = Agent()
    await agent.connect(connect_agent)
    ping = (await send(hub, http, {"name": "ping"}))[1]
    assert ping["state"] == "completed"  # delivered after anything queued before it: nothing was
    assert [command["name"] for command in agent.received] == ["ping"]


async def test_an_ack_after_the_wait_still_completes_the_command(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = Agent(hold=True)
    await agent.connect(connect_agent)
    status, view = await send(hub, http, {"name": "ping", "wait_s": 0.1})
    assert (status, view["state"]) == (201, "delivered")
    agent.release.set()
    assert (await until(hub, http, view["id"], "completed"))["result"]["pong"] is True


async def test_a_delivered_command_never_acked_expires_and_a_late_ack_changes_nothing(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = Agent(hold=True)
    await agent.connect(connect_agent)
    status, view = await send(hub, http, {"name": "ping", "ttl_s": 0.3, "wait_s": 5})
    assert (status, view["state"]) == (201, "expired")  # the wait ends when the command does
    assert "did not answer" in view["error"]
    assert view["delivered_at"] is not None
    agent.release.set()
    ping = (await send(hub, http, {"name": "ping"}))[1]  # acks come in order: the late one is in
    assert ping["state"] == "completed"
    assert (await get(hub, http, view["id"]))["state"] == "expired"


async def test_commands_survive_a_restart_and_a_delivered_one_is_never_sent_again(settings: Settings) -> None:
    held = Agent(hold=True)
    runner, hub = await start_hub(settings)
    try:
        conn = await open_agent(hub, "agent-1", handlers={"command": held.on_command})
        async with operator(hub) as http:
            sent = (await send(hub, http, {"name": "ping", "wait_s": 0}))[1]
            await conn.close()
            queued = (await send(hub, http, {"name": "status", "wait_s": 0}))[1]
    finally:
        await runner.cleanup()
        held.release.set()
    assert (sent["state"], queued["state"]) == ("delivered", "queued")

    agent = Agent()
    runner, hub = await start_hub(settings)
    try:
        conn = await open_agent(hub, "agent-1", handlers={"command": agent.on_command})
        async with operator(hub) as http:
            assert (await until(hub, http, queued["id"], "completed"))["result"] == {"spool_depth": 0}
            assert (await get(hub, http, sent["id"]))["state"] == "delivered"  # until its TTL passes
        await conn.close()
    finally:
        await runner.cleanup()
    assert [command["id"] for command in agent.received] == [queued["id"]]


async def test_the_same_id_replays_the_command_and_other_content_conflicts(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = Agent()
    await agent.connect(connect_agent)
    await known_but_offline(connect_agent, "agent-2")
    body = {"id": "op-42.a", "name": "ping", "args": {"n": 1}}
    status, created = await send(hub, http, body)
    assert (status, created["id"], created["state"]) == (201, "op-42.a", "completed")

    status, replayed = await send(hub, http, {**body, "wait_s": 0, "ttl_s": 5})
    assert (status, replayed) == (200, created)
    assert len(agent.received) == 1

    for other, agent_id in (({**body, "args": {"n": 2}}, "agent-1"), ({**body, "name": "status"}, "agent-1"),
                            (body, "agent-2")):  # fmt: skip
        status, problem = await send(hub, http, other, agent_id=agent_id)
        assert status == 409
        assert problem["command_id"] == "op-42.a"
        assert "'op-42.a'" in problem["detail"]
    assert len(agent.received) == 1


async def test_a_dashboard_sees_every_state_change(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await known_but_offline(connect_agent)
    async with http.ws_connect(f"/ws/live?access_token={hub.token()}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        view = (await send(hub, http, {"name": "ping", "wait_s": 0}))[1]

        async def next_state() -> str:
            while True:
                message = await ws.receive_json(timeout=5)
                if message["type"] == "command" and message["data"]["id"] == view["id"]:
                    state: str = message["data"]["state"]
                    return state

        assert await next_state() == "queued"
        await Agent().connect(connect_agent)
        seen = [await next_state()]
        while seen[-1] != "completed":
            seen.append(await next_state())
    # A dashboard that falls behind gets the latest state only; in order, whatever it skips.
    assert seen in (["delivered", "completed"], ["completed"])


async def test_reading_needs_hub_read_and_sending_hub_write(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await known_but_offline(connect_agent)
    async with http.post(
        SEND.format(agent_id="agent-1"), json={"name": "ping"}, headers=auth(hub)
    ) as response:
        assert response.status == 403
        assert (await response.json())["required_scope"] == "hub:write"
    async with http.post(SEND.format(agent_id="agent-1"), json={"name": "ping"}) as response:
        assert response.status == 401
    view = (await send(hub, http, {"name": "ping", "wait_s": 0}))[1]
    assert (await get(hub, http, view["id"]))["id"] == view["id"]


@pytest.mark.parametrize(
    ("agent_id", "body", "status", "words"),
    [
        ("agent-9", {"name": "ping"}, 404, "no agent 'agent-9'"),
        ("a" * 65, {"name": "ping"}, 422, "path.agent_id"),
        ("agent-1", {"name": "ping", "id": "../x"}, 422, "body.id"),
        ("agent-1", {"name": "ping; rm -rf /"}, 422, "body.name"),
        ("agent-1", {"name": "ping", "ttl_s": 0}, 422, "body.ttl_s"),
        ("agent-1", {"name": "ping", "ttl_s": 10**7}, 422, "command_max_ttl_s"),
        ("agent-1", {"name": "ping", "wait_s": 61}, 422, "command_max_wait_s"),
        ("agent-1", {"name": "ping", "args": {"blob": "x" * 20_000}}, 422, "command_max_args_bytes"),
        ("agent-1", {"name": "ping", "priority": 1}, 422, "body.priority"),
    ],
)
async def test_bad_requests_are_refused_with_the_reason(
    hub: RunningHub,
    http: aiohttp.ClientSession,
    connect_agent: ConnectAgent,
    agent_id: str,
    body: dict[str, Any],
    status: int,
    words: str,
) -> None:
    await known_but_offline(connect_agent)
    answer = await send(hub, http, body, agent_id=agent_id)
    assert answer[0] == status
    assert words in answer[1]["detail"]


async def test_an_agents_commands_list_newest_first_by_state_and_page(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await known_but_offline(connect_agent)
    ids = [(await send(hub, http, {"id": f"c{n}", "name": "ping", "wait_s": 0}))[1]["id"] for n in range(3)]
    await Agent().connect(connect_agent)
    await until(hub, http, "c2", "completed")
    assert (await send(hub, http, {"id": "late", "name": "reboot"}))[1]["state"] == "failed"
    listed, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        async with http.get("/api/v1/agents/agent-1/commands", params=params, headers=auth(hub)) as response:
            assert response.status == 200
            page = await response.json()
        listed += [command["id"] for command in page["data"]]
        cursor = page["pagination"]["cursor"]
        if cursor is None:
            break
    assert listed == ["late", *reversed(ids)]
    query = {"state": "completed"}
    async with http.get("/api/v1/agents/agent-1/commands", params=query, headers=auth(hub)) as response:
        assert [command["id"] for command in (await response.json())["data"]] == ["c2", "c1", "c0"]
    async with http.get("/api/v1/agents/agent-7/commands", headers=auth(hub)) as response:
        assert response.status == 404
    async with http.get("/api/v1/commands/nope", headers=auth(hub)) as response:
        assert response.status == 404


@pytest.fixture
async def unswept(hub_with: HubStarter) -> RunningHub:
    """A hub that sweeps expired commands once a minute: only the TTL checks stop them meanwhile."""
    return await hub_with({"command_sweep_interval_s": 60.0})


async def test_an_ack_after_the_ttl_does_not_complete_the_command(unswept: RunningHub) -> None:
    agent = Agent(hold=True)
    conn = await open_agent(unswept, "agent-1", handlers={"command": agent.on_command})
    try:
        async with operator(unswept) as http:
            view = (await send(unswept, http, {"name": "ping", "ttl_s": 0.2, "wait_s": 0}))[1]
            assert view["state"] == "delivered"
            await asyncio.sleep(0.3)
            agent.release.set()
            ping = (await send(unswept, http, {"name": "ping"}))[1]  # acks come in order: the late one is in
            assert ping["state"] == "completed"
            late = await get(unswept, http, view["id"])
            assert (late["state"], late["completed_at"], late["result"]) == ("delivered", None, None)
    finally:
        await conn.close()


async def test_a_command_whose_ttl_passes_before_its_turn_is_never_sent(
    unswept: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await open_agent(unswept, "agent-1")
    await conn.close()
    async with operator(unswept) as http:
        stale = (await send(unswept, http, {"name": "flush_spool", "ttl_s": 0.1, "wait_s": 0}))[1]
        await asyncio.sleep(0.2)
        # Read the queue as it stood before the TTL passed, as a delivery behind others does.
        real = unswept.store.queued_commands
        monkeypatch.setattr(unswept.store, "queued_commands", lambda agent_id, now: real(agent_id, 0.0))
        agent = Agent()
        conn = await open_agent(unswept, "agent-1", handlers={"command": agent.on_command})
        try:
            assert (await send(unswept, http, {"name": "ping"}))[1]["state"] == "completed"
            assert [command["name"] for command in agent.received] == ["ping"]
            assert (await get(unswept, http, stale["id"]))["state"] == "queued"  # until the sweep
        finally:
            await conn.close()
