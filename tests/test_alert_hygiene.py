"""Alert hygiene: repeats fold into one counted alert; webhooks route by rule, tag, severity, agent group."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import HubStarter, RunningHub, call, open_agent
from tests.test_deliveries import ALL_TYPES, WEBHOOKS, Receiver, client, subscribe, until
from tests.test_deliveries import receivers as receivers
from tests.test_deliveries import settings as settings
from tests.test_scoring import T0, attack

ATTACK_RULES = {"shell-from-web-server", "reverse-shell-port", "shadow-read"}
GROUPS = {"front": ["agent-1"], "back": ["agent-[23]"]}


def attack_again(round_: int, start_seq: int, t0: float) -> list[dict[str, Any]]:
    """The same attack chain in new processes: new pids, the same executables."""
    events = attack(start_seq, t0)
    for event in events:
        event["pid"] += 1000 * round_
        if event.get("ppid") == 100:
            event["ppid"] += 1000 * round_
    return events


async def alerts_of(http: aiohttp.ClientSession, hub: RunningHub, query: str = "") -> list[dict[str, Any]]:
    status, page = await call(http, hub, "GET", f"/api/v1/alerts?limit=100{query}", scope="hub:read")
    assert status == 200, page
    return list(page["data"])


async def run_attacks(hub: RunningHub, agent_id: str, *starts: float) -> None:
    agent = await open_agent(hub, agent_id)
    try:
        for round_, t0 in enumerate(starts):
            ack = await agent.send({"events": attack_again(round_, 1 + 10 * round_, t0)})
            assert ack["accepted"] == 4
            await hub.settle()
    finally:
        await agent.close()


# fingerprints and suppression ----------------------------------------------------------------


async def test_a_repeated_attack_folds_into_one_counted_alert_per_rule_announced_once(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({})
    receiver = await receivers()
    async with client(hub) as http:
        await subscribe(http, hub, receiver)
        await run_attacks(hub, "agent-1", T0, T0 + 60)
        alerts = await alerts_of(http, hub)
        by_rule = {alert["rule_id"]: alert for alert in alerts}
        assert len(by_rule) == len(alerts)  # one alert per rule
        assert set(by_rule) >= ATTACK_RULES
        for alert in alerts:
            assert alert["count"] == 2, alert
            assert alert["ts"] < alert["last_seen_at"]
            assert alert["pid"] == 200  # the first alert's own process, kept
            assert len(alert["fingerprint"]) == 64
        assert by_rule["shadow-read"]["tags"] == ["credentials", "file"]
        threshold = next(a for a in alerts if a["rule_id"].startswith("risk-threshold-"))
        assert set(threshold["tags"]) >= {"web", "webshell", "reverse-shell"}  # its explaining rules

        same = await alerts_of(http, hub, f"&fingerprint={by_rule['shadow-read']['fingerprint']}")
        assert [a["id"] for a in same] == [by_rule["shadow-read"]["id"]]
        status, problem = await call(http, hub, "GET", "/api/v1/alerts?fingerprint=nope", scope="hub:read")
        assert status == 422, problem

        await until(lambda: asyncio.sleep(0, len(receiver.of("alert_raised")) >= len(alerts)))
        await asyncio.sleep(0.3)  # a repeat would have been queued with the repeat's pass
        raised = receiver.of("alert_raised")
        assert sorted(body["rule_id"] for body in raised) == sorted(by_rule)  # one delivery per rule
        assert all(body["fingerprint"] == by_rule[body["rule_id"]]["fingerprint"] for body in raised)


async def test_a_repeat_after_the_window_is_a_new_alert(hub_with: HubStarter) -> None:
    hub = await hub_with({"alert_suppression_window_s": 5.0})
    await run_attacks(hub, "agent-1", T0, T0 + 2, T0 + 60)
    async with client(hub) as http:
        shadow = [a for a in await alerts_of(http, hub) if a["rule_id"] == "shadow-read"]
    assert [a["count"] for a in shadow] == [1, 2]  # newest first: after the window, a new one
    assert shadow[0]["fingerprint"] == shadow[1]["fingerprint"]
    assert shadow[0]["id"] != shadow[1]["id"]


async def test_a_resolved_alert_absorbs_no_repeats(hub_with: HubStarter) -> None:
    hub = await hub_with({})
    await run_attacks(hub, "agent-1", T0)
    async with client(hub) as http:
        (first,) = [a for a in await alerts_of(http, hub) if a["rule_id"] == "shadow-read"]
        status, resolved = await call(http, hub, "POST", f"/api/v1/alerts/{first['id']}:resolve", {})
        assert status == 200, resolved
        agent = await open_agent(hub, "agent-1")
        try:
            assert (await agent.send({"events": attack_again(1, 11, T0 + 60)}))["accepted"] == 4
            await hub.settle()
        finally:
            await agent.close()
        shadow = [a for a in await alerts_of(http, hub) if a["rule_id"] == "shadow-read"]
    assert [(a["status"], a["count"]) for a in shadow] == [("open", 1), ("resolved", 1)]


async def test_different_agents_and_lineages_do_not_fold(hub_with: HubStarter) -> None:
    hub = await hub_with({})
    await run_attacks(hub, "agent-1", T0)
    await run_attacks(hub, "agent-2", T0)
    other = attack_again(1, 11, T0 + 60)
    other[1]["exe"] = "/bin/bash"  # the same parent, another shell: another lineage
    agent = await open_agent(hub, "agent-1")
    try:
        assert (await agent.send({"events": other}))["accepted"] == 4
        await hub.settle()
    finally:
        await agent.close()
    async with client(hub) as http:
        shadow = [a for a in await alerts_of(http, hub) if a["rule_id"] == "shadow-read"]
    assert [a["count"] for a in shadow] == [1, 1, 1]
    assert len({a["fingerprint"] for a in shadow}) == 3


# routing --------------------------------------------------------------------------------------


async def test_routes_choose_receivers_by_rule_tag_severity_and_agent_group(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"agent_groups": GROUPS})
    by_rule, by_tag, critical, front, back, everything = [await receivers() for _ in range(6)]
    alert_types = ["alert_raised", "risk_threshold_crossed"]
    async with client(hub) as http:
        await subscribe(http, hub, by_rule, rule_ids=["shadow-read", "reverse-shell-port"])
        await subscribe(http, hub, by_tag, tags=["webshell", "nope"])
        await subscribe(http, hub, critical, severities=["CRITICAL"], event_types=alert_types)
        await subscribe(http, hub, front, agent_groups=["front"], event_types=ALL_TYPES)
        await subscribe(http, hub, back, agent_groups=["back"], event_types=ALL_TYPES)
        await subscribe(http, hub, everything, event_types=ALL_TYPES)
        await run_attacks(hub, "agent-1", T0)
        await run_attacks(hub, "agent-2", T0)
        await until(lambda: asyncio.sleep(0, len(everything.of("agent_offline")) == 2))
        await until(lambda: asyncio.sleep(0, len(everything.of("risk_threshold_crossed")) >= 2))
        await asyncio.sleep(0.5)  # deliveries queued with the same commits have arrived too

    def rules(receiver: Receiver) -> set[str]:
        return {body["rule_id"] for body in receiver.of("alert_raised")}

    def agents(receiver: Receiver) -> set[str]:
        return {got["body"]["agent_id"] for got in receiver.received}

    assert rules(by_rule) == {"shadow-read", "reverse-shell-port"}
    assert rules(by_tag) == {"shell-from-web-server"} | {r for r in rules(everything) if "threshold" in r}
    assert {got["body"]["severity"] for got in critical.received} == {"CRITICAL"}
    assert critical.of("risk_threshold_crossed")
    assert agents(front) == {"agent-1"}
    assert agents(back) == {"agent-2"}
    assert front.of("agent_online")
    assert front.of("agent_offline")
    assert rules(front) == rules(everything)
    assert agents(everything) == {"agent-1", "agent-2"}


async def test_route_filters_are_validated_naming_the_field(
    hub_with: HubStarter, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    hub = await hub_with({"agent_groups": GROUPS})
    receiver = await receivers()
    presence = ["agent_online"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"agent_groups": ["nobody"]}, "body.agent_groups"),
        ({"rule_ids": ["Not A Rule"]}, "body.rule_ids"),
        ({"severities": ["SEVERE"]}, "body.severities"),
        ({"tags": []}, "body.tags"),
        ({"tags": ["web"], "event_types": presence}, "body.tags"),
        ({"rule_ids": ["shadow-read"], "event_types": presence}, "body.rule_ids"),
    ]
    async with client(hub) as http:
        for fields, where in cases:
            body = {"url": receiver.url, "event_types": ["alert_raised"], **fields}
            status, problem = await call(http, hub, "POST", WEBHOOKS, body)
            assert status == 422, (fields, problem)
            assert where in problem["detail"], (fields, problem)
        webhook_id = await subscribe(http, hub, receiver, agent_groups=["front"], tags=["shell", "web"])
        status, webhook = await call(http, hub, "GET", f"{WEBHOOKS}/{webhook_id}")
        assert webhook["agent_groups"] == ["front"]
        assert webhook["tags"] == ["shell", "web"]
        assert webhook["rule_ids"] is None
        patch = {"tags": None, "severities": ["HIGH", "CRITICAL", "HIGH"]}
        status, webhook = await call(http, hub, "PATCH", f"{WEBHOOKS}/{webhook_id}", patch)
        assert status == 200, webhook
        assert (webhook["agent_groups"], webhook["tags"], webhook["severities"]) == (
            ["front"], None, ["CRITICAL", "HIGH"],
        )  # fmt: skip
        change = {"event_types": presence}
        status, problem = await call(http, hub, "PATCH", f"{WEBHOOKS}/{webhook_id}", change)
        assert status == 422, problem
        assert "body.severities" in problem["detail"], problem
