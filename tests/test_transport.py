"""The `/agent` namespace over real mTLS sockets: hello, events, acks, dedupe, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import msgpack
import pytest
import socketio

from hub.app import NAMESPACE_KEY
from hub.config import Settings
from hub.keys import PRESENCE
from hub.problems import Unavailable
from hub.transport import PacketQueue
from tests.conftest import (
    AgentConn,
    ConnectAgent,
    HubStarter,
    RunningHub,
    client_ssl,
    make_events,
    open_agent,
    start_hub,
    try_connect,
)


async def test_hello_reports_last_stored_seq(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-1")
    hello = agent.hello.result()
    assert hello["agent_id"] == "agent-1"
    assert hello["last_seq"] == 0
    assert hello["max_batch"] == 1000
    assert hello["heartbeat_interval_s"] == 30.0

    ack = await agent.send({"events": make_events(1, 25)})
    assert ack == {"accepted": 25, "duplicates": 0, "rejected": [], "last_seq": 25}
    await agent.close()

    again = await connect_agent("agent-1")
    assert again.hello.result()["last_seq"] == 25


async def test_stream_10000_with_server_cut_stores_each_exactly_once(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    produced = make_events(1, 10_000)
    batches = [produced[i : i + 100] for i in range(0, len(produced), 100)]
    agent = await connect_agent("agent-1")
    acked_through = 0
    for index, batch in enumerate(batches[:40]):
        ack = await agent.send({"events": batch})
        assert ack["accepted"] == len(batch)
        acked_through = ack["last_seq"]
        if index == 39:
            # Cut from the server side while the agent has a batch in flight.
            in_flight = asyncio.ensure_future(
                agent.sio.call("events", {"events": batches[40]}, namespace="/agent", timeout=2)
            )
            await _cut(hub, "agent-1")
            with pytest.raises(Exception):  # noqa: B017, PT011 - the client raises its own disconnect error
                await in_flight
    # The agent resends everything after hello.last_seq, which may include the cut batch.
    agent = await connect_agent("agent-1")
    resume = agent.hello.result()["last_seq"]
    assert resume >= acked_through
    remaining = [event for event in produced if event["seq"] > resume]
    # Resend one already-stored batch too: it must count as duplicates, not be stored twice.
    dup_ack = await agent.send({"events": batches[0]})
    assert dup_ack["accepted"] == 0
    assert dup_ack["duplicates"] == 100
    for start in range(0, len(remaining), 100):
        ack = await agent.send({"events": remaining[start : start + 100]})
        assert not ack["rejected"]
    assert ack["last_seq"] == 10_000
    assert await hub.store.count_events("agent-1") == 10_000


async def _cut(hub: RunningHub, agent_id: str) -> None:
    from hub.app import NAMESPACE_KEY
    from hub.keys import PRESENCE

    sid = hub.app[PRESENCE].sid_of(agent_id)
    assert sid is not None
    await hub.app[NAMESPACE_KEY].close(sid, "transport_lost")


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        ([1, 2, 3], "invalid_input", "must be an object"),
        ({"events": {"seq": 1}}, "invalid_input", "'events' must be a list"),
        ({"nothing": []}, "invalid_input", "'events' must be a list"),
        ({"events": make_events(1, 1001)}, "batch_too_large", "limit is 1000"),
        (b"\xc1\xc1 not msgpack", "invalid_input", "not valid msgpack"),
        ("a string", "invalid_input", "must be an object"),
    ],
)
async def test_malformed_batch_gets_error_and_socket_stays_up(
    hub: RunningHub, connect_agent: ConnectAgent, payload: object, code: str, words: str
) -> None:
    agent = await connect_agent("agent-2")
    answer = await agent.send(payload)
    assert answer["error"]["code"] == code
    assert words in answer["error"]["message"]
    ack = await agent.send({"events": make_events(1, 3)})
    assert ack["accepted"] == 3
    assert await hub.store.count_events("agent-2") == 3


async def test_bad_events_are_rejected_one_by_one(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-1")
    events = make_events(1, 5)
    events[1]["pid"] = "not-a-pid"
    events[3]["kind"] = "teleport"
    events[4]["surprise"] = True
    ack = await agent.send({"events": events})
    assert ack["accepted"] == 2
    assert [r["index"] for r in ack["rejected"]] == [1, 3, 4]
    assert [r["seq"] for r in ack["rejected"]] == [2, 4, 5]
    assert "pid" in ack["rejected"][0]["error"]
    assert "kind" in ack["rejected"][1]["error"]
    assert "surprise" in ack["rejected"][2]["error"]
    assert await hub.store.count_events("agent-1") == 2


async def test_an_unknown_field_alone_is_rejected_by_name(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    # Otherwise valid: the batch passes the lenient validation and is caught by its length.
    agent = await connect_agent("agent-1")
    events = make_events(1, 3)
    events[2]["colour"] = "red"
    ack = await agent.send({"events": events})
    assert ack["accepted"] == 2
    assert [(r["index"], r["seq"]) for r in ack["rejected"]] == [(2, 3)]
    assert "colour" in ack["rejected"][0]["error"]
    assert await hub.store.count_events("agent-1") == 2


async def test_msgpack_batches_are_accepted(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-3")
    ack = await agent.send(msgpack.packb({"events": make_events(1, 50)}))
    assert ack["accepted"] == 50
    ack = await agent.send(msgpack.packb({"events": make_events(41, 20)}))
    assert ack == {"accepted": 10, "duplicates": 10, "rejected": [], "last_seq": 60}


async def test_oversized_msgpack_batch_is_refused_by_size(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-3")
    big = make_events(1, 10)
    big[0]["argv"] = ["x" * 1_100_000]
    answer = await agent.send(msgpack.packb({"events": big}))
    assert answer["error"]["code"] == "batch_too_large"
    assert "max_batch_bytes" in answer["error"]["message"]


async def test_oversized_event_and_deep_metadata_are_rejected(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    events = make_events(1, 3)
    events[0]["argv"] = ["y" * 20_000]
    deep: dict[str, object] = {}
    node = deep
    for _ in range(20):
        node["d"] = {}
        node = node["d"]  # type: ignore[assignment]
    events[1]["metadata"] = deep
    ack = await agent.send({"events": events})
    assert ack["accepted"] == 1
    assert "max_event_bytes" in ack["rejected"][0]["error"]
    assert "nested deeper" in ack["rejected"][1]["error"]


async def test_heartbeat_is_acked_and_stored(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-1")
    beat = {
        "ts": 1.0,
        "cpu_percent": 3.5,
        "mem_percent": 40.0,
        "disk_percent": 50.0,
        "spool_depth": 7,
        "dropped": 2,
        "uptime_s": 12.0,
    }
    ack = await agent.send(beat, event="heartbeat")
    assert ack["next_in_s"] == 30.0
    stored = await hub.store.get_agent("agent-1")
    assert stored["status"] == "online"
    assert stored["heartbeat"]["spool_depth"] == 7
    assert stored["heartbeat"]["dropped"] == 2
    bad = await agent.send({"ts": "yesterday"}, event="heartbeat")
    assert bad["error"]["code"] == "invalid_input"


async def test_a_seq_twice_in_one_batch_is_rejected_not_counted(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    events = make_events(1, 3)
    events.append({**events[1], "path": "/tmp/other"})
    ack = await agent.send({"events": events})
    assert ack["accepted"] == 3
    assert ack["rejected"] == [{"index": 3, "seq": 2, "error": "seq 2 appears twice in this batch"}]
    await hub.settle()
    assert await hub.store.count_events("agent-1") == 3


async def test_absurdly_deep_metadata_is_rejected_without_harm(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    deep: list[object] = []
    for _ in range(900):
        deep = [deep]
    events = make_events(1, 2)
    events[0]["metadata"] = {"x": deep}
    ack = await agent.send(msgpack.packb({"events": events}))
    assert ack["accepted"] == 1
    assert "nested deeper" in ack["rejected"][0]["error"]


async def test_json_batch_over_the_byte_limit_gets_an_error_and_the_socket_stays(
    hub: RunningHub, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-2")
    events = make_events(1, 100)
    for event in events:
        event["argv"] = ["z" * 12_000]  # 1.2 MB of JSON: over max_batch_bytes, under the frame limit
    answer = await agent.send({"events": events})
    assert answer["error"]["code"] == "batch_too_large"
    assert "max_batch_bytes" in answer["error"]["message"]
    assert (await agent.send({"events": make_events(1, 2)}))["accepted"] == 2


async def test_batches_larger_than_one_sqlite_statement_are_stored(settings: Settings) -> None:
    runner, big = await start_hub(settings.model_copy(update={"max_batch_events": 6000}))
    try:
        agent = await open_agent(big, "agent-1")
        ack = await agent.send({"events": make_events(1, 6000)})
        assert (ack["accepted"], ack["last_seq"]) == (6000, 6000)
        again = await agent.send({"events": make_events(1, 6000)})
        assert again["duplicates"] == 6000
        await agent.close()
    finally:
        await runner.cleanup()


async def test_dev_mode_still_checks_the_agent_id(settings: Settings) -> None:
    runner, dev = await start_hub(settings.model_copy(update={"dev_insecure": True}))
    try:
        good = await open_agent(dev, None, auth={"agent_id": "lab-box"})
        assert good.hello.result()["agent_id"] == "lab-box"
        await good.close()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await open_agent(dev, None, auth={"agent_id": "../etc"})
        assert await dev.store.get_agent("../etc") is None
    finally:
        await runner.cleanup()


async def test_one_socket_cannot_pile_up_unbounded_batches(settings: Settings) -> None:
    runner, small = await start_hub(settings.model_copy(update={"max_batches_in_flight": 2}))
    try:
        agent = await open_agent(small, "agent-1")
        answers = await asyncio.gather(
            *(agent.send({"events": make_events(1 + 10 * i, 10)}) for i in range(30))
        )
        refused = [a for a in answers if "error" in a]
        assert refused
        assert {a["error"]["code"] for a in refused} == {"overloaded"}
        assert "max_batches_in_flight" in refused[0]["error"]["message"]
        stored = sum(a.get("accepted", 0) for a in answers)
        assert await small.store.count_events("agent-1") == stored
        await agent.close()
    finally:
        await runner.cleanup()


def _disk_error() -> Unavailable:
    return Unavailable("storage unavailable: disk I/O error", retry_after_ms=100)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("get_certificate", sqlite3.OperationalError("disk I/O error")),
        ("is_revoked", _disk_error()),
        (
            "save_certificate",
            Unavailable("storage unavailable: database or disk is full", retry_after_ms=100),
        ),
    ],
)
async def test_a_store_failure_while_identifying_is_answered_unavailable(
    hub: RunningHub, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch, call: str, error: Exception
) -> None:
    async def failing(*args: object) -> None:
        raise error

    monkeypatch.setattr(hub.store, call, failing)
    refusal = await try_connect(hub, hub.certs / "agent-1.pem", hub.certs / "agent-1.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "unavailable"
    assert not hub.app[NAMESPACE_KEY].server.manager.pending_connect
    monkeypatch.undo()
    assert (await connect_agent("agent-1")).sio.connected


@pytest.mark.parametrize("call", ["last_seq", "save_agent"])
async def test_a_refused_connection_leaves_the_agents_socket_in_place(
    hub: RunningHub, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    first = await connect_agent("agent-1")
    sid = hub.app[PRESENCE].sid_of("agent-1")

    async def failing(*args: object) -> None:
        raise _disk_error()

    monkeypatch.setattr(hub.store, call, failing)
    refusal = await try_connect(hub, hub.certs / "agent-1.pem", hub.certs / "agent-1.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "unavailable"
    monkeypatch.undo()
    assert hub.app[PRESENCE].sid_of("agent-1") == sid
    assert first.sio.connected
    assert (await first.send({"events": make_events(1, 2)}))["accepted"] == 2
    assert (await hub.store.get_agent("agent-1"))["status"] == "online"


async def test_simultaneous_connections_of_one_agent_leave_one_socket(hub: RunningHub) -> None:
    presence = hub.app[PRESENCE]
    for _ in range(5):
        sockets = await asyncio.gather(_dial(hub, "agent-1"), _dial(hub, "agent-1"))
        try:
            for _ in range(250):
                if sum(sio.connected for sio, _session in sockets) < 2:
                    break
                await asyncio.sleep(0.02)
            alive = [sio.get_sid("/agent") for sio, _session in sockets if sio.connected]
            assert alive == [presence.sid_of("agent-1")]
        finally:
            for sio, session in sockets:
                await sio.disconnect()
                await session.close()
    for _ in range(100):  # the hub records the last disconnects after the clients are gone
        if not presence._turns:
            break
        await asyncio.sleep(0.02)
    assert not presence._turns  # no per-agent lock outlives its use


async def _dial(hub: RunningHub, agent_id: str) -> tuple[socketio.AsyncClient, aiohttp.ClientSession]:
    """Connect a socket of `agent_id` without waiting for its hello (a superseded one gets none)."""
    ctx = client_ssl(hub.certs / "ca.pem", hub.certs / f"{agent_id}.pem", hub.certs / f"{agent_id}.key")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
    sio = socketio.AsyncClient(http_session=session, reconnection=False)
    await sio.connect(hub.url, namespaces=["/agent"], transports=["websocket"], wait_timeout=10)
    return sio, session


@pytest.fixture
async def quota_hub(hub_with: HubStarter) -> RunningHub:
    quota = {"agent_max_events_per_s": 2000.0, "agent_burst_events": 2000}
    return await hub_with(quota)


async def test_an_agent_flooding_past_its_quota_is_throttled_alone(quota_hub: RunningHub) -> None:
    hub = quota_hub
    flooder, steady = await open_agent(hub, "agent-1"), await open_agent(hub, "agent-2")
    try:
        accepted = {"agent-1": 0, "agent-2": 0}
        throttled = {"agent-1": 0, "agent-2": 0}

        async def send(conn: AgentConn, agent_id: str, batches: int, pause_s: float) -> None:
            seq = 1
            for _ in range(batches):
                ack = await conn.send({"events": make_events(seq, 100)})
                if "error" in ack:
                    assert ack["error"]["code"] == "overloaded"
                    assert ack["error"]["retry_after_ms"] > 0
                    throttled[agent_id] += 1
                else:
                    accepted[agent_id] += ack["accepted"]
                    seq += 100
                await asyncio.sleep(pause_s)

        # Over about 2 s the flooder offers ten times its quota; the steady agent half of it.
        await asyncio.gather(send(flooder, "agent-1", 400, 0.0), send(steady, "agent-2", 20, 0.1))
        assert throttled["agent-1"] > 0
        assert accepted["agent-1"] < 0.5 * 400 * 100
        assert (throttled["agent-2"], accepted["agent-2"]) == (0, 2000)
    finally:
        await flooder.close()
        await steady.close()


@pytest.fixture
async def impatient_hub(hub_with: HubStarter) -> RunningHub:
    return await hub_with({"sqlite_busy_timeout_s": 0.3, "database_timeout_s": 1.0})


@contextlib.asynccontextmanager
async def events_locked_by_another_program(settings: Settings) -> AsyncIterator[None]:
    """Another program holds what storing events needs: SQLite's write lock, or PostgreSQL's events table."""
    if settings.database_url is None:
        locker = sqlite3.connect(settings.db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=5)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # readers pass, writers wait
            yield
    finally:
        await conn.close()


async def test_a_store_locked_by_another_process_answers_unavailable_and_loses_nothing(
    impatient_hub: RunningHub,
) -> None:
    hub = impatient_hub
    agent = await open_agent(hub, "agent-1")
    try:
        assert (await agent.send({"events": make_events(1, 10)}))["accepted"] == 10
        async with events_locked_by_another_program(hub.settings):
            ack = await agent.send({"events": make_events(11, 10)})
            assert ack["error"]["code"] == "unavailable"
            assert ack["error"]["retry_after_ms"] > 0
            assert (await agent.send({"events": make_events(11, 10)}))["error"]["code"] == "unavailable"
        # The lock is gone: the agent's retry is stored, once.
        ack = await agent.send({"events": make_events(11, 10)})
        assert (ack["accepted"], ack["duplicates"], ack["last_seq"]) == (10, 0, 20)
        assert await hub.store.count_events("agent-1") == 20
    finally:
        await agent.close()


async def test_a_sockets_packet_queue_keeps_order_and_loses_nothing_to_a_timed_out_read() -> None:
    queue = PacketQueue()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    # Engine.IO's writer waits with a timeout: a read that times out must not take the next packet.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), 0.01)
    waiting = queue.get()
    queue.put_nowait("a")  # handed to the waiting read
    await queue.put("b")
    queue.put_nowait("c")
    assert await waiting == "a"
    assert (queue.qsize(), queue.empty()) == (2, False)
    assert [queue.get_nowait(), await queue.get()] == ["b", "c"]
    assert queue.empty()


async def test_a_sockets_packet_queue_joins_once_every_packet_is_done() -> None:
    queue = PacketQueue()
    await queue.join()  # nothing put: returns at once
    for packet in ("a", "b"):
        queue.put_nowait(packet)
    joined = asyncio.ensure_future(queue.join())
    queue.get_nowait()
    queue.task_done()
    await asyncio.sleep(0)
    assert not joined.done()
    queue.get_nowait()
    queue.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError, match="too many times"):
        queue.task_done()


async def test_a_closed_connection_leaves_no_reference_cycle(hub: RunningHub) -> None:
    # A cycle around each closed socket would hold its TLS state and buffers until a full
    # collection, which stalls the whole hub for as long as it takes.
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for drop in (False, True, False, True):
            agent = await open_agent(hub, "agent-1")
            if drop:  # the network goes away: no Socket.IO or Engine.IO goodbye
                await agent.sio.eio.ws.close()
            await agent.close()
            await asyncio.sleep(0.2)
        gc.collect()
        left = {type(item).__name__ for item in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not left & {"WebSocketResponse", "AsyncSocket", "SSLProtocol", "OSError"}


async def test_an_agent_socket_never_negotiates_compression(hub: RunningHub) -> None:
    # Browsers and the JavaScript client offer it; accepted, it would cost the hub zlib state on
    # every socket. Refused, the client goes on uncompressed.
    context = client_ssl(hub.certs / "ca.pem", hub.certs / "agent-1.pem", hub.certs / "agent-1.key")
    url = f"{hub.url}/socket.io/?EIO=4&transport=websocket"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.ws_connect(url, compress=15) as ws,
    ):
        assert ws.compress == 0
        opened = await ws.receive_str(timeout=5)
        assert opened.startswith("0{")  # Engine.IO's open packet: the socket works as it is


async def test_a_client_that_starts_with_long_polling_upgrades_and_streams(hub: RunningHub) -> None:
    # The JavaScript client's default: polling first, then the WebSocket upgrade with its probe.
    agent = await open_agent(hub, "agent-1", transports=("polling", "websocket"))
    try:
        for _ in range(100):
            if agent.sio.transport() == "websocket":
                break
            await asyncio.sleep(0.05)
        assert agent.sio.transport() == "websocket"
        ack = await agent.send({"events": make_events(1, 5)})
        assert ack["accepted"] == 5
    finally:
        await agent.close()
    assert await hub.store.count_events("agent-1") == 5


async def test_a_socket_that_joins_no_namespace_is_closed(hub_with: HubStarter) -> None:
    # Only joining /agent checks the certificate: a connection without one may not linger.
    hub = await hub_with({"connect_timeout_s": 2.0})  # time enough for the agent to join under load
    agent = await open_agent(hub, "agent-1")
    url = f"{hub.url}/socket.io/?EIO=4&transport=websocket"
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
        ) as session,
        session.ws_connect(url) as ws,
    ):
        assert (await ws.receive_str(timeout=5)).startswith("0{")
        goodbye, closed = await ws.receive(timeout=10), await ws.receive(timeout=5)
        assert goodbye.data == "1"  # Engine.IO's CLOSE packet, then the WebSocket closes
        assert closed.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED}
    assert agent.sio.connected  # an agent that joined in time stays
    assert (await agent.sio.call("heartbeat", {"ts": 1.0}, namespace="/agent", timeout=5))["next_in_s"] > 0
    await agent.close()


async def test_one_address_may_hold_only_so_many_sockets_that_have_not_joined(hub_with: HubStarter) -> None:
    hub = await hub_with({"max_connecting_per_address": 2})
    url = f"{hub.url}/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    ) as session:
        first, second = await session.ws_connect(url), await session.ws_connect(url)
        for ws in (first, second):
            assert (await ws.receive_str(timeout=5)).startswith("0{")  # open, never joining
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
        assert refused.value.status == 429
        assert refused.value.headers is not None
        assert refused.value.headers["Retry-After"] == "1"
        polling = url.replace("websocket", "polling")  # the same refusal, its body readable
        async with session.get(polling) as answer:
            assert answer.status == 429
            problem = await answer.json(content_type="application/problem+json")
            assert "has 2 connections that have not joined /agent yet" in problem["detail"]
        await first.close()
        agent = await open_agent(hub, "agent-1")  # in the freed place; joined, it counts no more
        third = await session.ws_connect(url)
        assert (await third.receive_str(timeout=5)).startswith("0{")
        await agent.close()
        for ws in (second, third):
            await ws.close()
