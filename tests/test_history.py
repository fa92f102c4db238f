"""What the agent page charts and draws: heartbeat history and process trees."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from tests.conftest import ConnectAgent, RunningHub, bearer
from tests.test_scoring import T0


async def get(http: aiohttp.ClientSession, hub: RunningHub, path: str, **params: Any) -> tuple[int, Any]:
    query = {name: str(value) for name, value in params.items()}
    async with http.get(path, params=query, headers=bearer(hub)) as response:
        return response.status, await response.json(content_type=None)


def beat(n: int) -> dict[str, Any]:
    return {"ts": T0 + n, "cpu_percent": 10.0 + n, "mem_percent": 20.0, "disk_percent": 30.0,
            "spool_depth": n, "dropped": 0, "uptime_s": 100.0 + n}  # fmt: skip


async def _send_beats(connect_agent: ConnectAgent, agent_id: str, count: int) -> None:
    agent = await connect_agent(agent_id)
    for n in range(count):
        ack = await agent.send(beat(n), event="heartbeat")
        assert "server_time" in ack, ack


async def test_heartbeats_are_kept_and_listed_oldest_first(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    before = time.time()
    await _send_beats(connect_agent, "agent-1", 5)
    await _send_beats(connect_agent, "agent-2", 1)
    status, page = await get(http, hub, "/api/v1/agents/agent-1/heartbeats")
    assert status == 200, page
    points = page["data"]
    assert [point["cpu_percent"] for point in points] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert points[0] == {"ts": points[0]["ts"], **{k: v for k, v in beat(0).items() if k != "ts"}}
    stamps = [point["ts"] for point in points]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] <= time.time()  # the hub's receive time
    assert page["pagination"] == {"cursor": None, "has_more": False}


async def test_heartbeats_filter_by_time_and_page_on(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await _send_beats(connect_agent, "agent-1", 5)
    _, page = await get(http, hub, "/api/v1/agents/agent-1/heartbeats")
    stamps = [point["ts"] for point in page["data"]]
    _, window = await get(http, hub, "/api/v1/agents/agent-1/heartbeats", since=stamps[1], until=stamps[4])
    assert [point["ts"] for point in window["data"]] == stamps[1:4]
    _, first = await get(http, hub, "/api/v1/agents/agent-1/heartbeats", since=stamps[1], limit=2)
    assert [point["ts"] for point in first["data"]] == stamps[1:3]
    cursor = first["pagination"]["cursor"]
    _, second = await get(
        http, hub, "/api/v1/agents/agent-1/heartbeats", since=stamps[1], limit=2, cursor=cursor
    )
    assert [point["ts"] for point in second["data"]] == stamps[3:5]
    status, _ = await get(http, hub, "/api/v1/agents/agent-1/heartbeats", since=stamps[0], cursor=cursor)
    assert status == 400  # a cursor is bound to its filters


async def test_heartbeats_of_an_unknown_agent_are_not_found(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    status, problem = await get(http, hub, "/api/v1/agents/nobody/heartbeats")
    assert status == 404, problem


async def test_old_heartbeats_are_pruned(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await _send_beats(connect_agent, "agent-1", 4)
    _, page = await get(http, hub, "/api/v1/agents/agent-1/heartbeats")
    stamps = [point["ts"] for point in page["data"]]
    assert await hub.store.prune_heartbeats(stamps[2]) == 2
    _, page = await get(http, hub, "/api/v1/agents/agent-1/heartbeats")
    assert [point["ts"] for point in page["data"]] == stamps[2:]
    assert (await hub.store.get_agent("agent-1"))["heartbeat"] == beat(3)  # the latest stays on the agent


def _start(seq: int, pid: int, ppid: int) -> dict[str, Any]:
    # Run from /tmp, so a rule scores it: only processes with a risk are stored.
    return {"seq": seq, "ts": T0 + seq, "kind": "process_start", "pid": pid, "ppid": ppid,
            "exe": f"/tmp/stage{seq}", "comm": f"stage{seq}"}  # fmt: skip


async def _keys(http: aiohttp.ClientSession, hub: RunningHub) -> dict[tuple[int, float], str]:
    _, page = await get(http, hub, "/api/v1/processes", agent_id="agent-1", limit=100)
    return {(process["pid"], process["start_ts"] - T0): process["process_key"] for process in page["data"]}


async def _tree(http: aiohttp.ClientSession, hub: RunningHub, key: str) -> list[tuple[str, str | None]]:
    status, tree = await get(http, hub, f"/api/v1/processes/{key}/tree")
    assert status == 200, tree
    assert tree["process_key"] == key
    assert {"risk_score", "explanation", "comm", "ppid"} <= set(tree["nodes"][0])
    return [(node["process_key"], node["parent_key"]) for node in tree["nodes"]]


async def test_a_process_tree_links_ancestors_and_descendants(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    chain = [_start(1, 10, 1), _start(2, 20, 10), _start(3, 30, 20), _start(4, 40, 30), _start(5, 50, 40)]
    sibling = [_start(6, 21, 10)]
    # pid 20 exits and is reused by another child of 10, which starts a child of its own
    reuse = [
        {"seq": 7, "ts": T0 + 7, "kind": "process_exit", "pid": 20},
        _start(8, 20, 10),
        _start(9, 60, 20),
    ]
    assert (await agent.send({"events": chain + sibling + reuse}))["accepted"] == 9
    other = await connect_agent("agent-2")  # same pids on another host are no relatives
    await other.send({"events": [_start(1, 10, 1), _start(3, 31, 20)]})
    await hub.settle()
    k = await _keys(http, hub)
    p10, p20, p30, p40, p50 = k[10, 1], k[20, 2], k[30, 3], k[40, 4], k[50, 5]
    p21, p20b, p60 = k[21, 6], k[20, 8], k[60, 9]

    assert await _tree(http, hub, p20) == [(p10, None), (p20, p10), (p30, p20), (p40, p30), (p50, p40)]
    assert await _tree(http, hub, p10) == [
        (p10, None),
        (p20, p10), (p21, p10), (p20b, p10),  # children by start time
        (p30, p20), (p60, p20b),
        (p40, p30),  # three levels below at most
    ]  # fmt: skip
    assert await _tree(http, hub, p60) == [(p10, None), (p20b, p10), (p60, p20b)]


async def test_the_tree_of_an_unknown_process_is_not_found(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    status, problem = await get(http, hub, "/api/v1/processes/agent-1:999:0.000000/tree")
    assert status == 404, problem
