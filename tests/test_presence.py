"""Agent liveness: online, late and offline with their reasons, stored and pushed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hub.app import NAMESPACE_KEY
from hub.config import Settings
from hub.keys import PRESENCE
from hub.problems import Unavailable
from tests.conftest import (
    ConnectAgent,
    HubStarter,
    RunningHub,
    make_events,
    open_agent,
    sqlite_only,
    start_hub,
)

BEAT = {
    "ts": 1.0,
    "cpu_percent": 1.0,
    "mem_percent": 2.0,
    "disk_percent": 3.0,
    "spool_depth": 0,
    "dropped": 0,
    "uptime_s": 1.0,
}


@pytest.fixture
async def hub(hub_with: HubStarter) -> RunningHub:
    """A hub expecting heartbeats every 0.2 s: late after 0.3 s, offline after 0.6 s."""
    return await hub_with({"heartbeat_interval_s": 0.2})


async def _status_becomes(hub: RunningHub, agent_id: str, status: str) -> dict[str, object]:
    for _ in range(200):
        agent = await hub.store.get_agent(agent_id)
        if agent and agent["status"] == status:
            return agent
        await asyncio.sleep(0.02)
    raise AssertionError(f"{agent_id} never became {status}")


async def test_silent_agent_goes_late_then_offline_and_is_disconnected(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    late = await _status_becomes(hub, "agent-1", "late")
    assert late["status_reason"] == "missed_heartbeats"
    offline = await _status_becomes(hub, "agent-1", "offline")
    assert offline["status_reason"] == "missed_heartbeats"
    for _ in range(100):
        if not agent.sio.connected:
            break
        await asyncio.sleep(0.02)
    assert not agent.sio.connected


async def test_a_heartbeat_brings_a_late_agent_back_online(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-2")
    await _status_becomes(hub, "agent-2", "late")
    await agent.send(BEAT, event="heartbeat")
    back = await _status_becomes(hub, "agent-2", "online")
    assert back["status_reason"] == "heartbeat"


async def test_heartbeating_agent_stays_online(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-3")
    for _ in range(10):
        await agent.send(BEAT, event="heartbeat")
        await asyncio.sleep(0.1)
    assert (await hub.store.get_agent("agent-3"))["status"] == "online"


def _refuse_first_write(monkeypatch: pytest.MonkeyPatch, hub: RunningHub, *statuses: str) -> list[str]:
    """Make the store refuse the first write of each of `statuses` once; return those refused."""
    real = hub.store.save_agent
    refused: list[str] = []

    async def save_agent(agent_id: str, fields: dict[str, Any], notices: Any = None, **options: Any) -> bool:
        status = fields.get("status")
        if status in statuses and status not in refused:
            refused.append(status)
            raise Unavailable("storage unavailable: disk I/O error", retry_after_ms=100)
        return await real(agent_id, fields, notices, **options)

    monkeypatch.setattr(hub.store, "save_agent", save_agent)
    return refused


async def test_a_stock_client_that_disconnects_is_a_clean_disconnect(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    # python-socketio's client closes the WebSocket (code 1000) before its DISCONNECT packet
    # is sent; the close frame alone says the agent left on purpose.
    for _ in range(3):
        agent = await connect_agent("agent-1")
        await agent.close()
        offline = await _status_becomes(hub, "agent-1", "offline")
        assert offline["status_reason"] == "clean_disconnect"


async def test_a_connection_that_ends_without_a_close_frame_is_a_lost_transport(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    await agent.session.close()  # closes the connection under the WebSocket, as a crash would
    offline = await _status_becomes(hub, "agent-1", "offline")
    assert offline["status_reason"] == "transport_lost"


async def test_an_offline_the_store_refused_is_stored_later(
    hub: RunningHub, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await connect_agent("agent-1")
    refused = _refuse_first_write(monkeypatch, hub, "offline")
    await agent.close()
    offline = await _status_becomes(hub, "agent-1", "offline")
    assert offline["status_reason"] == "clean_disconnect"
    assert refused == ["offline"]
    # The disconnect handler did not fail, so python-socketio finished its own cleanup.
    assert not hub.app[NAMESPACE_KEY].server.manager.pending_disconnect


async def test_late_and_back_online_are_stored_though_the_store_refused_them_once(
    hub: RunningHub, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await connect_agent("agent-2")
    refused = _refuse_first_write(monkeypatch, hub, "late", "online")
    await _status_becomes(hub, "agent-2", "late")  # the watcher tries again
    failed = await agent.send(BEAT, event="heartbeat")
    assert failed["error"]["code"] == "unavailable"
    await agent.send(BEAT, event="heartbeat")  # the next heartbeat tries again
    back = await _status_becomes(hub, "agent-2", "online")
    assert back["status_reason"] == "heartbeat"
    assert refused == ["late", "online"]


async def test_agents_a_vanished_node_left_online_are_marked_offline(
    hub: RunningHub,
) -> None:
    # Rows as a node killed without a word leaves them: one silent long, one just seen.
    for agent_id, silent_s in (("agent-2", 60.0), ("agent-3", 0.0)):
        await hub.store.save_agent(agent_id, {"status": "online", "node": "node-gone",
                                              "last_seen": time.time() - silent_s})  # fmt: skip
    orphan = await _status_becomes(hub, "agent-2", "offline")
    assert orphan["status_reason"] == "missed_heartbeats"
    assert (await hub.store.get_agent("agent-3"))["status"] == "online"  # still within its window


async def test_restart_keeps_acked_events_and_marks_agents_offline(settings: Settings) -> None:
    runner, first = await start_hub(settings)
    agent = await open_agent(first, "agent-1")
    ack = await agent.send({"events": make_events(1, 500)})
    assert ack["accepted"] == 500
    await runner.cleanup()  # the agent is still connected when the hub stops
    await agent.close()

    runner, second = await start_hub(settings)
    try:
        assert await second.store.count_events("agent-1") == 500
        assert (await second.store.get_agent("agent-1"))["status"] == "offline"
        again = await open_agent(second, "agent-1")
        assert again.hello.result()["last_seq"] == 500
        await again.close()
    finally:
        await runner.cleanup()


@sqlite_only("checks the modes of the hub.db files; PostgreSQL keeps no data in data_dir")
async def test_the_database_is_readable_by_its_owner_only(settings: Settings) -> None:
    runner, running = await start_hub(settings)
    try:
        agent = await open_agent(running, "agent-1")
        await agent.send({"events": make_events(1, 3)})
        await agent.close()
        for path in settings.data_dir.glob("hub.db*"):
            assert path.stat().st_mode & 0o077 == 0, path
        assert settings.data_dir.stat().st_mode & 0o077 == 0
    finally:
        await runner.cleanup()


async def test_a_socket_left_on_a_node_the_agent_moved_from_changes_nothing(hub_with: HubStarter) -> None:
    # Two nodes on one database; the agent's old socket on A lingers after it connected to B.
    node_a, node_b = await hub_with({"node_id": "node-a"}), await hub_with({"node_id": "node-b"})
    old = await open_agent(node_a, "agent-1")
    new = await open_agent(node_b, "agent-1")
    try:
        await old.close()
        for _ in range(200):
            if node_a.app[PRESENCE].sid_of("agent-1") is None:
                break
            await asyncio.sleep(0.01)
        async with node_a.app[PRESENCE]._turns("agent-1"):  # A's offline write, if any, is done
            pass
        agent = await node_b.store.get_agent("agent-1")
        assert (agent["status"], agent["node"]) == ("online", "node-b")
    finally:
        await new.close()


async def test_an_agent_swept_offline_while_connected_is_restored_by_its_next_heartbeat(
    hub_with: HubStarter,
) -> None:
    hub = await hub_with({"heartbeat_interval_s": 30.0})
    agent = await open_agent(hub, "agent-1")
    try:
        # What another node's sweep leaves when this node could not reach the store for a while.
        await hub.store.save_agent("agent-1", {"status": "offline", "status_reason": "missed_heartbeats"})
        await agent.send(BEAT, event="heartbeat")
        restored = await hub.store.get_agent("agent-1")
        assert (restored["status"], restored["status_reason"]) == ("online", "restored")
        await agent.send(BEAT, event="heartbeat")  # an ordinary heartbeat changes no reason
        assert (await hub.store.get_agent("agent-1"))["status_reason"] == "restored"
    finally:
        await agent.close()
