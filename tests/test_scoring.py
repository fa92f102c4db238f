"""Live risk scoring end to end: the scripted attack, its explanation, alert and push; replay."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import msgpack
import pytest

from hub.config import Settings
from hub.keys import SCORING
from hub.models import Event
from hub.rules import RuleSet, load_rules, parse_rules
from hub.scoring import PASS_EVENTS, RiskEngine, RiskParams, recalculate
from hub.store import EventBatch, create_store
from tests.conftest import ConnectAgent, HubStarter, RunningHub, client_ssl, open_agent, start_hub

T0 = 1_700_000_000.0


def attack(start_seq: int = 1, t0: float = T0) -> list[dict[str, Any]]:
    """A web server spawns a shell, which calls a reverse-shell port and reads /etc/shadow."""
    events = [
        {
            "kind": "process_start",
            "pid": 100,
            "ppid": 1,
            "exe": "/usr/sbin/nginx",
            "comm": "nginx",
            "argv": ["nginx", "-g", "daemon off;"],
            "uid": 33,
        },
        {
            "kind": "process_start",
            "pid": 200,
            "ppid": 100,
            "exe": "/bin/sh",
            "comm": "sh",
            "argv": ["sh", "-c", "id"],
            "uid": 33,
        },
        {
            "kind": "net_connect",
            "pid": 200,
            "dst_ip": "203.0.113.7",
            "dst_port": 4444,
            "protocol": "tcp",
        },
        {"kind": "file_open", "pid": 200, "path": "/etc/shadow"},
    ]
    return [{"seq": start_seq + i, "ts": t0 + i, **event} for i, event in enumerate(events)]


async def open_dashboard(hub: RunningHub, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{hub.url}/ws/live", headers={"Authorization": f"Bearer {hub.token()}"})
    first = await ws.receive_json(timeout=5)
    assert first["type"] == "snapshot"
    return ws


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str, match: Any = None) -> dict[str, Any]:
    while True:
        message = await ws.receive_json(timeout=5)
        if message["type"] == kind and (match is None or match(message["data"])):
            data: dict[str, Any] = message["data"]
            return data


async def test_attack_scores_above_80_explains_alerts_and_pushes(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    ) as session:
        ws = await open_dashboard(hub, session)
        agent = await connect_agent("agent-1")
        ack = await agent.send({"events": attack()})
        assert ack["accepted"] == 4

        score = await next_of(ws, "score", lambda d: d["pid"] == 200 and d["risk_score"] > 80)
        assert score["process_id"] == "agent-1:200"
        rules = {c["rule_id"] for c in score["explanation"]}
        assert {"shell-from-web-server", "reverse-shell-port", "shadow-read"} <= rules
        alert = await next_of(ws, "alert", lambda d: d["pid"] == 200)
        assert alert["agent_id"] == "agent-1"
        assert alert["severity"] in ("HIGH", "CRITICAL")
        assert alert["mitre"]
        await ws.close()

    await hub.settle()
    page = await hub.store.list_scores(risk_min=80, agent_id=None, after=None, limit=10)
    assert [item["process_id"] for item in page.items] == ["agent-1:200"]
    alerts = await hub.store.list_alerts(agent_id="agent-1", severity=None, after=None, limit=50)
    raised = {a["rule_id"] for a in alerts.items}
    assert "risk-threshold-80" in raised
    assert "shadow-read" in raised


async def test_threshold_alert_fires_once_with_hysteresis(settings: Settings) -> None:
    engine = RiskEngine(load_rules(settings.rule_files), RiskParams.from_settings(settings))
    changed: dict[str, Any] = {}
    alerts = []
    for event in attack():
        alerts += engine.apply("a", event, changed)
    crossings = [a["threshold"] for a in alerts if a["threshold"] is not None]
    assert crossings == [50.0, 80.0]
    # More of the same keeps the score high: no second crossing alert.
    more = {"seq": 9, "ts": T0 + 10, "kind": "file_open", "pid": 200, "path": "/etc/shadow"}
    assert [a for a in engine.apply("a", more, changed) if a["threshold"] is not None] == []
    # After a long quiet time the score decays below the hysteresis band and re-arms.
    later = {"seq": 10, "ts": T0 + 30 * 600, "kind": "file_open", "pid": 200, "path": "/etc/shadow"}
    rearmed = [a["threshold"] for a in engine.apply("a", later, changed) if a["threshold"] is not None]
    assert rearmed == [50.0]


async def test_child_inherits_part_of_parent_risk(settings: Settings) -> None:
    engine = RiskEngine(load_rules(settings.rule_files), RiskParams.from_settings(settings))
    changed: dict[str, Any] = {}
    for event in attack():
        engine.apply("a", event, changed)
    child = {
        "seq": 5,
        "ts": T0 + 4,
        "kind": "process_start",
        "pid": 300,
        "ppid": 200,
        "exe": "/usr/bin/id",
    }
    engine.apply("a", child, changed)
    view = engine.view(next(p for p in changed.values() if p.pid == 300))
    assert 0 < view["risk_score"] < 100
    assert view["explanation"][0]["rule_id"] == "inherited"
    assert "agent-1" not in view["explanation"][0]["name"]
    assert "a:200" in view["explanation"][0]["name"]


async def test_replay_gives_the_same_scores_as_live(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-2")
    events = attack()
    benign = [
        {
            "seq": 5 + i,
            "ts": T0 + 5 + i,
            "kind": "file_open",
            "pid": 400 + i % 3,
            "path": "/var/log/x",
        }
        for i in range(50)
    ]
    extra = [
        {
            "seq": 55,
            "ts": T0 + 60,
            "kind": "process_start",
            "pid": 201,
            "ppid": 200,
            "exe": "/usr/bin/curl",
        },
        {"seq": 56, "ts": T0 + 61, "kind": "syscall", "pid": 201, "syscall": "ptrace"},
        {
            "seq": 57,
            "ts": T0 + 900,
            "kind": "file_write",
            "pid": 200,
            "path": "/root/.ssh/authorized_keys",
        },
        {"seq": 58, "ts": T0 + 901, "kind": "process_exit", "pid": 201},
    ]
    for batch in (events, benign, extra):
        assert not (await agent.send({"events": batch}))["rejected"]
    await hub.settle()
    live = await hub.store.list_scores(risk_min=0, agent_id="agent-2", after=None, limit=100)
    live_scores = {item["process_key"]: (item["risk_score"], item["explanation"]) for item in live.items}
    assert len(live_scores) >= 2

    count = await recalculate(
        hub.store, RiskEngine(load_rules(hub.settings.rule_files), RiskParams.from_settings(hub.settings))
    )
    assert count == 58
    replayed = await hub.store.list_scores(risk_min=0, agent_id="agent-2", after=None, limit=100)
    assert {
        item["process_key"]: (item["risk_score"], item["explanation"]) for item in replayed.items
    } == live_scores


async def test_dashboard_sees_agent_presence(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    ) as session:
        ws = await open_dashboard(hub, session)
        agent = await connect_agent("agent-3")
        online = await next_of(ws, "agent", lambda d: d["agent_id"] == "agent-3")
        assert online["status"] == "online"
        await agent.close()
        offline = await next_of(
            ws, "agent", lambda d: d["agent_id"] == "agent-3" and d["status"] == "offline"
        )
        assert offline["reason"] == "clean_disconnect"
        await ws.close()


async def test_dashboard_without_token_is_refused(hub: RunningHub) -> None:
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
        ) as session,
        session.get(f"{hub.url}/ws/live") as response,
    ):
        assert response.status == 401
        body = json.loads(await response.text())
        assert body["title"] == "Authentication required"
    await asyncio.sleep(0)


async def test_one_jump_over_both_thresholds_is_one_alert(settings: Settings) -> None:
    rules = RuleSet(
        parse_rules(
            '[[rule]]\nid = "big"\nname = "Big"\nseverity = "LOW"\nweight = 100\n'
            '[rule.when]\nkind = "custom"\n'
        )
    )
    engine = RiskEngine(rules, RiskParams.from_settings(settings))
    alerts = engine.apply("a", {"seq": 1, "ts": T0, "kind": "custom", "pid": 1}, {})
    assert [(a["rule_id"], a["severity"], a["risk_score"]) for a in alerts] == [
        ("risk-threshold-80", "CRITICAL", 86.47)
    ]


async def test_scores_of_acked_events_survive_an_immediate_shutdown(settings: Settings) -> None:
    runner, first = await start_hub(settings)
    agent = await open_agent(first, "agent-1")
    assert (await agent.send({"events": attack()}))["accepted"] == 4
    await runner.cleanup()  # no settling: shutdown itself must score and persist
    await agent.close()
    runner, second = await start_hub(settings)
    try:
        page = await second.store.list_scores(risk_min=80, agent_id="agent-1", after=None, limit=10)
        assert [item["process_id"] for item in page.items] == ["agent-1:200"]
    finally:
        await runner.cleanup()


async def store_unscored(
    settings: Settings, events: list[dict[str, Any]], *, node_id: str | None = None
) -> None:
    """Store a batch as a hub does and score nothing: what a hub killed in between leaves behind."""
    store = create_store(settings.model_copy(update={"node_id": node_id or settings.node_id}))
    await store.open()
    try:
        stored: list[Event] = events  # type: ignore[assignment]  # test events are valid Events
        await store.commit_events(
            EventBatch("agent-1", stored, [msgpack.packb(e) for e in events], time.time())
        )
    finally:
        await store.close()


async def shadow_readers(hub: RunningHub) -> list[tuple[str, float]]:
    """The processes of agent-1 scored 80 or more, with their scores."""
    page = await hub.store.list_scores(risk_min=80, agent_id="agent-1", after=None, limit=10)
    return [(item["process_id"], item["risk_score"]) for item in page.items]


async def test_events_stored_but_never_scored_are_scored_when_their_agent_returns(
    settings: Settings,
) -> None:
    await store_unscored(settings, attack())
    runner, hub = await start_hub(settings)
    try:
        for _ in range(2):  # the second return finds nothing pending: nothing counts twice
            agent = await open_agent(hub, "agent-1")
            await hub.settle()
            await agent.close()
            assert [process_id for process_id, _ in await shadow_readers(hub)] == ["agent-1:200"]
            alerts = await hub.store.list_alerts(agent_id="agent-1", severity=None, after=None, limit=50)
            assert ("shadow-read", 1) in [(alert["rule_id"], alert["count"]) for alert in alerts.items]
    finally:
        await runner.cleanup()


async def test_many_events_left_unscored_are_scored_in_passes_of_the_usual_size(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass runs on the event loop: one over everything a crash under load left would stall acks.
    batch = PASS_EVENTS // 2
    for first in range(1, 6 * batch, batch):
        await store_unscored(
            settings,
            [{"seq": seq, "ts": T0 + seq, "kind": "file_open", "pid": 7, "path": "/tmp/x"}
             for seq in range(first, first + batch)],
        )  # fmt: skip
    runner, hub = await start_hub(settings)
    passes: list[int] = []  # events each pass scored, as its flush reports them
    insert_alerts = hub.store.insert_alerts

    async def recording(*args: Any, scored: list[tuple[str, int]], **kwargs: Any) -> Any:
        passes.append(len(scored) * batch)
        return await insert_alerts(*args, scored=scored, **kwargs)

    monkeypatch.setattr(hub.store, "insert_alerts", recording)
    try:
        agent = await open_agent(hub, "agent-1")
        await hub.settle()
        await agent.close()
        assert sum(passes) == 6 * batch
        assert max(passes) <= PASS_EVENTS
        assert (await hub.store.scoring_states(["agent-1"]))["agent-1"].pending == []
    finally:
        await runner.cleanup()


async def test_a_batch_stored_after_later_ones_were_scored_is_scored_too(hub: RunningHub) -> None:
    # An agent's batches need not commit in seq order: one answered `overloaded` is sent again
    # after the next ones were stored. Here that retry is stored and the hub never scores it.
    agent = await open_agent(hub, "agent-1")
    later = [
        {"seq": 10 + i, "ts": T0 + 10 + i, "kind": "file_open", "pid": 7, "path": "/tmp/x"} for i in range(5)
    ]
    assert (await agent.send({"events": later}))["accepted"] == 5
    await hub.settle()
    await agent.close()
    await store_unscored(hub.settings, attack())
    agent = await open_agent(hub, "agent-1")
    await hub.settle()
    await agent.close()
    assert [process_id for process_id, _ in await shadow_readers(hub)] == ["agent-1:200"]


async def test_only_events_that_may_change_a_score_wait_for_scoring(hub: RunningHub) -> None:
    # Ingest picks them out while it validates: the rest of a batch is never queued, but the batch
    # is scored all the same (its pending mark cleared, its events counted).
    scoring = hub.app[SCORING]
    agent = await open_agent(hub, "agent-1")
    benign = [
        {"seq": seq, "ts": T0 + seq, "kind": "file_open", "pid": 7, "path": f"/var/lib/app/{seq}"}
        for seq in range(1, 100)
    ]
    scored = scoring.scored
    async with scoring.held():
        acks = [await agent.send({"events": benign}), await agent.send({"events": attack(start_seq=100)})]
        assert [ack["accepted"] for ack in acks] == [99, 4]
        assert scoring.backlog == 4  # the attack's four events; none of the 99
        assert len((await hub.store.scoring_states(["agent-1"]))["agent-1"].pending) == 2
    await hub.settle()
    await agent.close()
    assert scoring.backlog == 0
    assert scoring.scored - scored == 103
    assert (await hub.store.scoring_states(["agent-1"]))["agent-1"].pending == []
    assert [process_id for process_id, _ in await shadow_readers(hub)] == ["agent-1:200"]


async def test_a_batch_waits_for_scoring_then_is_refused_as_overloaded(hub_with: HubStarter) -> None:
    hub = await hub_with({"scoring_max_backlog": 1, "scoring_wait_s": 0.2})
    scoring = hub.app[SCORING]
    agent = await open_agent(hub, "agent-1")
    async with scoring.held():
        assert (await agent.send({"events": attack()}))["accepted"] == 4
        refused = await agent.send({"events": attack(start_seq=5)})
    assert refused["error"]["code"] == "overloaded"
    assert refused["error"]["message"] == "scoring is behind"
    await hub.settle()  # room again: the batch the agent sends again is taken
    assert (await agent.send({"events": attack(start_seq=5)}))["accepted"] == 4
    await agent.close()


async def test_another_nodes_pending_batch_is_left_to_it_then_taken_over(hub_with: HubStarter) -> None:
    hub = await hub_with({"scoring_takeover_s": 2.0})
    await store_unscored(hub.settings, attack(), node_id="node-that-died")
    agent = await open_agent(hub, "agent-1")
    await hub.settle()
    await agent.close()
    assert await shadow_readers(hub) == []  # that node may be scoring it still
    for _ in range(100):  # the agent does not come back: the hub looks again by itself
        await asyncio.sleep(0.05)
        await hub.settle()
        if await shadow_readers(hub):
            break
    assert [process_id for process_id, _ in await shadow_readers(hub)] == ["agent-1:200"]


async def test_reloading_an_agent_while_it_streams_scores_each_event_once(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    # Each reload reads the store while the next batch commits: what is queued must not be read too.
    agent = await connect_agent("agent-2")
    events = attack()
    batches = [events[:2], events[2:], *[[event] for event in attack(start_seq=5, t0=T0 + 10)]]
    for batch in batches:
        hub.app[SCORING].reload("agent-2")
        assert not (await agent.send({"events": batch}))["rejected"]
    await hub.settle()
    live = await hub.store.list_scores(risk_min=0, agent_id="agent-2", after=None, limit=100)

    await recalculate(
        hub.store, RiskEngine(load_rules(hub.settings.rule_files), RiskParams.from_settings(hub.settings))
    )
    replayed = await hub.store.list_scores(risk_min=0, agent_id="agent-2", after=None, limit=100)
    assert [(item["process_key"], item["risk_score"]) for item in live.items] == [
        (item["process_key"], item["risk_score"]) for item in replayed.items
    ]


async def test_tracked_processes_per_agent_are_bounded(settings: Settings) -> None:
    params = RiskParams.from_settings(settings.model_copy(update={"max_processes_per_agent": 3}))
    engine = RiskEngine(load_rules(settings.rule_files), params)
    for event in attack():  # pid 200 becomes risky
        engine.apply("a", event, {})
    for pid in range(300, 310):
        engine.apply(
            "a", {"seq": pid, "ts": T0 + pid, "kind": "process_start", "pid": pid, "exe": "/bin/true"}, {}
        )
    live = {p.pid: p.risk_score for p in engine.processes()}
    assert len(live) == 3
    assert live[200] > 80


async def test_an_agent_moving_between_nodes_scores_on_from_its_stored_state(
    settings: Settings, hub_with: HubStarter
) -> None:
    # Two nodes on one database (the same data folder): the agent goes A -> B -> A.
    nodes = [await hub_with({"node_id": "node-a"}), await hub_with({"node_id": "node-b"})]
    events = [*attack(), {"seq": 5, "ts": T0 + 30, "kind": "file_open", "pid": 200, "path": "/etc/shadow"}]
    for node, batch in zip(
        [nodes[0], nodes[1], nodes[0]], [events[:2], events[2:4], events[4:]], strict=True
    ):
        agent = await open_agent(node, "agent-1")
        try:
            assert (await agent.send({"events": batch}))["accepted"] == len(batch)
            await node.settle()
        finally:
            await agent.close()

    # The same events scored by one engine that saw them all.
    engine = RiskEngine(load_rules(settings.rule_files), RiskParams.from_settings(settings))
    changed: dict[str, Any] = {}
    for event in events:
        engine.apply("agent-1", event, changed)  # type: ignore[arg-type]  # test events are valid Events
    expected = {key: engine.record(process)["risk_score"] for key, process in changed.items()}
    for node in nodes:
        stored = {key: (await node.store.get_process(key))["risk_score"] for key in expected}
        assert stored == expected
