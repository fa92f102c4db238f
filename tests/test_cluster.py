"""Two real hub nodes (`agenthub serve` processes) on one store and the machine's Redis.

Agents land on either node; dashboards, commands and revocations reach across to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
import socketio
from cryptography import x509
from pydantic import ValidationError

from bench.reliability.kill9 import RecordingSession, Tally, paced_events
from hub.certs import fingerprint, issue_agent
from hub.config import Settings
from hub.push import RedisBus, Subscriber
from hub.store import Store, create_store
from hub.tokens import create_token
from tests.conftest import AgentConn, call, client_ssl, free_port, open_agent, require_tool, try_connect
from tests.test_certificates import pem, save, self_signed
from tests.test_commands import Agent
from tests.test_nginx import start_nginx, wait_for_port
from tests.test_scoring import attack, next_of

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Node:
    """One `agenthub serve` process; `open_agent` and `call` take it as they take a `RunningHub`."""

    name: str
    url: str
    certs: Path
    settings: Settings
    process: asyncio.subprocess.Process
    log: Path
    redis_prefix: str

    def token(self, *scopes: str) -> str:
        return create_token(self.settings, scopes=list(scopes or ["hub:read"]), subject="tester")

    def operator(self) -> aiohttp.ClientSession:
        """An operator's HTTP client for this node."""
        context = client_ssl(self.certs / "ca.pem")
        return aiohttp.ClientSession(base_url=self.url, connector=aiohttp.TCPConnector(ssl=context))


@pytest.fixture
async def redis_url() -> str:
    """The machine's Redis: skip without it here, fail without it in CI."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required in CI but does not answer ({exc})")
        pytest.skip(f"no Redis answers at {REDIS_URL} ({exc}); the cluster tests need one")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
def shared_store(tmp_path: Path, postgres_url: str) -> dict[str, str]:
    """The store every node uses, as settings: a PostgreSQL schema of this test's own."""
    return {"HUB_DATABASE_URL": postgres_url, "HUB_DATA_DIR": str(tmp_path / "data")}


NodeStarter = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(
    settings: Settings, shared_store: dict[str, str], redis_url: str, tmp_path: Path
) -> AsyncIterator[NodeStarter]:
    """Start hub nodes of one hub: same store, certificates, token secret and Redis channels."""
    assert settings.jwt_secret is not None
    common = {
        **{key: value for key, value in os.environ.items() if not key.startswith("HUB_")},
        **shared_store,
        "HUB_CERTS_DIR": str(settings.certs_dir),
        "HUB_JWT_SECRET": settings.jwt_secret.get_secret_value(),
        "HUB_REDIS_URL": redis_url,
        "HUB_REDIS_PREFIX": f"test-{uuid.uuid4().hex}",  # runs side by side never hear each other
        "HUB_PUSH_STATS_INTERVAL_S": "0.2",
        "HUB_LOG_FORMAT": "text",
    }
    nodes: list[Node] = []

    async def start(name: str, **env: str) -> Node:
        port = free_port()
        log = tmp_path / f"{name}.log"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hub.cli", "serve",
                env={**common, "HUB_PORT": str(port), "HUB_NODE_ID": name, **env},
                cwd=tmp_path, stdout=output, stderr=output,
            )  # fmt: skip
        scheme = "http" if env.get("HUB_LISTEN_TLS") == "false" else "https"
        node = Node(name, f"{scheme}://127.0.0.1:{port}", settings.certs_dir, settings, process, log,
                    common["HUB_REDIS_PREFIX"])  # fmt: skip
        nodes.append(node)
        await _listening(node, port)
        return node

    yield start
    for node in nodes:
        await _stop(node)
        print(f"--- {node.name} ---\n{node.log.read_text()[-8000:]}")  # shown when the test failed


async def _listening(node: Node, port: int) -> None:
    for _ in range(600):
        if node.process.returncode is not None:
            raise AssertionError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{node.name} did not listen on {port}: {node.log.read_text()[-3000:]}")


async def _stop(node: Node) -> None:
    if node.process.returncode is None:
        node.process.terminate()
        try:
            async with asyncio.timeout(20):
                await node.process.wait()
        except TimeoutError:
            node.process.kill()
            await node.process.wait()


@pytest.fixture
async def nodes(start_node: NodeStarter) -> tuple[Node, Node]:
    """Nodes A and B; B starts once A has set up the store."""
    return await start_node("node-a"), await start_node("node-b")


AgentOpener = Callable[..., Awaitable[AgentConn]]


@pytest.fixture
async def agents() -> AsyncIterator[AgentOpener]:
    """Connect real agents to a node: `await agents(node, "agent-1")`; closed before the nodes stop."""
    opened: list[AgentConn] = []

    async def connect(node: Node, agent_id: str, **options: Any) -> AgentConn:
        conn = await open_agent(node, agent_id, **options)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        await conn.close()


async def _dashboard(node: Node, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{node.url}/ws/live?access_token={node.token()}")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    return ws


async def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def _queued_soon(node: Node, agent_id: str) -> bool:
    """Wait (5 s at most) until `node` lists a queued command for `agent_id`."""
    async with node.operator() as http:
        for _ in range(100):
            path = f"/api/v1/agents/{agent_id}/commands?state=queued"
            status, page = await call(http, node, "GET", path, scope="hub:read")
            if status == 200 and page["data"]:
                return True
            await asyncio.sleep(0.05)
    return False


async def _ping(http: aiohttp.ClientSession, node: Node, *, wait_s: float) -> tuple[int, Any]:
    """Send agent-1 a `ping` command through `node`, waiting up to `wait_s` for its end."""
    body = {"name": "ping", "wait_s": wait_s}
    return await call(http, node, "POST", "/api/v1/agents/agent-1/commands", body, scope="hub:write")


async def test_agents_land_on_both_nodes_and_each_node_lists_them_all(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    await agents(a, "agent-1")
    await agents(b, "agent-2")
    for node in (a, b):
        async with node.operator() as http:
            status, page = await call(http, node, "GET", "/api/v1/agents", scope="hub:read")
        assert status == 200, page
        where = {item["agent_id"]: (item["status"], item["node"]) for item in page["data"]}
        assert where == {"agent-1": ("online", "node-a"), "agent-2": ("online", "node-b")}


async def test_a_dashboard_on_b_receives_the_scores_of_an_agent_on_a(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    async with b.operator() as session:
        ws = await _dashboard(b, session)
        agent = await agents(a, "agent-1")
        online = await next_of(ws, "agent", lambda d: d["agent_id"] == "agent-1" and d["status"] == "online")
        assert online["node"] == "node-a"
        ack = await agent.send({"events": attack()})
        assert ack["accepted"] == 4
        score = await next_of(ws, "score", lambda d: d["pid"] == 200 and d["risk_score"] > 80)
        assert score["process_id"] == "agent-1:200"
        alert = await next_of(ws, "alert", lambda d: d["pid"] == 200)
        assert alert["agent_id"] == "agent-1"
        # A node's own readings stay on its own dashboards.
        assert (await next_of(ws, "stats"))["node"] == "node-b"
        assert (await next_of(ws, "stats"))["node"] == "node-b"
        await ws.close()


async def test_a_command_sent_through_b_reaches_the_agent_on_a_and_its_result_comes_back(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    agent = Agent()
    await agents(a, "agent-1", handlers={"command": agent.on_command})
    async with b.operator() as http, a.operator() as watching:
        ws = await _dashboard(a, watching)
        status, view = await _ping(http, b, wait_s=10)
        assert status == 201, view
        assert (view["state"], view["result"]["pong"], view["error"]) == ("completed", True, None)
        assert agent.received == [{"id": view["id"], "name": "ping", "args": {}}]
        seen = await next_of(ws, "command", lambda d: d["id"] == view["id"] and d["state"] == "completed")
        assert seen == view
        await ws.close()
        status, stored = await call(watching, a, "GET", f"/api/v1/commands/{view['id']}", scope="hub:read")
    assert (status, stored) == (200, view)


async def test_a_command_goes_over_the_agents_newest_connection_not_a_stale_one_on_another_node(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    # The agent reconnected to B while A still holds its old socket (a peer gone silent is only
    # noticed when its heartbeats stop): A must leave the command to B.
    a, b = nodes
    stale, fresh = Agent(), Agent()
    await agents(a, "agent-1", handlers={"command": stale.on_command})
    await agents(b, "agent-1", handlers={"command": fresh.on_command})
    async with a.operator() as http:
        status, view = await _ping(http, a, wait_s=10)
    assert (status, view["state"], view["result"]["pong"]) == (201, "completed", True)
    assert fresh.received == [{"id": view["id"], "name": "ping", "args": {}}]
    assert stale.received == []


async def test_an_agent_that_reconnects_to_b_has_its_old_socket_on_a_closed(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    stale = await agents(a, "agent-1")  # its network went silent: A has not noticed
    await agents(b, "agent-1")
    assert await _within(5, lambda: not stale.sio.connected)
    async with a.operator() as http:
        status, agent = await call(http, a, "GET", "/api/v1/agents/agent-1", scope="hub:read")
    assert (status, agent["status"], agent["node"]) == (200, "online", "node-b")  # A's close changed nothing
    assert "closing its old socket here" in a.log.read_text()


async def test_a_command_waiting_on_b_for_an_offline_agent_completes_when_it_connects_to_a(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    await (await agents(a, "agent-1")).close()  # known to the hub, offline now
    async with b.operator() as http:
        sending = asyncio.create_task(_ping(http, b, wait_s=15))
        assert await _queued_soon(a, "agent-1")  # stored by B, with nobody to deliver it
        agent = Agent()
        await agents(a, "agent-1", handlers={"command": agent.on_command})
        status, view = await sending
    assert (status, view["state"], view["result"]["pong"]) == (201, "completed", True)
    assert agent.received == [{"id": view["id"], "name": "ping", "args": {}}]


async def test_revoking_on_b_disconnects_the_agent_on_a_within_one_second(
    nodes: tuple[Node, Node], agents: AgentOpener
) -> None:
    a, b = nodes
    agent = await agents(a, "agent-2")
    told: list[Any] = []
    agent.sio.on("revoked", told.append, namespace="/agent")
    bystander = await agents(a, "agent-3")
    cert = x509.load_pem_x509_certificate((a.certs / "agent-2.pem").read_bytes())
    async with b.operator() as http:
        started = time.monotonic()
        status, revoked = await call(
            http, b, "POST", f"/api/v1/certificates/{fingerprint(cert)}:revoke", {"reason": "key leaked"}
        )
        assert status == 200, revoked
        assert await _within(1.0 - (time.monotonic() - started), lambda: not agent.sio.connected)
    assert told == [{"reason": "key leaked"}]
    assert bystander.sio.connected
    async with a.operator() as http:
        status, stored = await call(http, a, "GET", "/api/v1/agents/agent-2", scope="hub:read")
    assert (stored["status"], stored["status_reason"], stored["node"]) == ("offline", "revoked", "node-a")
    refusal = await try_connect(a, a.certs / "agent-2.pem", a.certs / "agent-2.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"


async def test_what_comes_over_redis_is_a_hint_and_garbage_harms_nothing(
    nodes: tuple[Node, Node], agents: AgentOpener, redis_url: str
) -> None:
    a, b = nodes
    agent = await agents(a, "agent-2")
    cert = x509.load_pem_x509_certificate((a.certs / "agent-2.pem").read_bytes())
    client = redis.Redis.from_url(redis_url)
    try:
        channel = f"{a.redis_prefix}:push"
        # Whoever can write to Redis: garbage, then a revocation the store never recorded.
        for raw in (b'["evil","certificate","k"]\nnot json', b"[1,2,3]\n{}", b'{"a": 1}', b"\xff\n\xff"):
            await client.publish(channel, raw)
        forged = {
            "type": "certificate",
            "data": {"fingerprint": fingerprint(cert), "status": "revoked", "reason": "x"},
        }
        await client.publish(
            channel, orjson.dumps(["forger", "certificate", fingerprint(cert)]) + b"\n" + orjson.dumps(forged)
        )
        await asyncio.sleep(0.5)
        assert agent.sio.connected
        # The reader survived: a real revocation on B still reaches the agent on A at once.
        async with b.operator() as http:
            status, _ = await call(
                http, b, "POST", f"/api/v1/certificates/{fingerprint(cert)}:revoke", {"reason": "leak"}
            )
            assert status == 200
        assert await _within(1.0, lambda: not agent.sio.connected)
    finally:
        await client.aclose()


async def test_a_revocation_no_node_announced_closes_the_socket_within_seconds(
    nodes: tuple[Node, Node], agents: AgentOpener, postgres_url: str
) -> None:
    a, _ = nodes
    agent = await agents(a, "agent-2")
    cert = x509.load_pem_x509_certificate((a.certs / "agent-2.pem").read_bytes())
    # Straight into the store, as when Redis lost the message: each node's periodic check finds it.
    store = create_store(Settings(database_url=postgres_url))
    await store.open()
    try:
        await store.revoke(
            fingerprint(cert), serial=format(cert.serial_number, "x"), agent_id="agent-2", reason="leak"
        )
    finally:
        await store.close()
    assert await _within(8.0, lambda: not agent.sio.connected)


async def test_a_certificate_uploaded_on_b_lets_its_agent_connect_to_a(
    nodes: tuple[Node, Node], agents: AgentOpener, tmp_path: Path
) -> None:
    a, b = nodes
    cert, key = self_signed("edge-7")
    save(tmp_path, "edge-7", cert, key)
    async with b.operator() as http:
        status, view = await call(
            http, b, "POST", "/api/v1/certificates", {"agent_id": "edge-7", "certificate": pem(cert)}
        )
        assert status == 201, view
    for _ in range(100):  # node A hears of it over Redis and reads it from the store
        with contextlib.suppress(socketio.exceptions.ConnectionError):
            if await try_connect(a, tmp_path / "edge-7.pem", tmp_path / "edge-7.key") is None:
                break
        await asyncio.sleep(0.05)
    agent = await agents(a, "edge-7", certs=tmp_path)
    assert (await agent.hello)["agent_id"] == "edge-7"


async def test_a_recalculation_on_b_sends_dashboards_on_a_a_fresh_snapshot(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    async with a.operator() as watching, b.operator() as http:
        ws = await _dashboard(a, watching)
        status, job = await call(http, b, "POST", "/api/v1/scores:recalculate")
        assert status == 202, job
        assert (await next_of(ws, "snapshot"))["agent_counts"] is not None
        await ws.close()


def _bus(url: str, channel: str) -> RedisBus:
    # A subscriber has room for every key the tests send: it resyncs only when another node asks.
    return RedisBus(
        url,
        channel=channel,
        max_unsent=100,
        max_pending=1000,
        max_subscribers=5,
        max_per_owner=5,
        send_timeout_s=1,
    )


@pytest.fixture
def channel() -> str:
    """A channel of the test's own: runs side by side never hear each other."""
    return f"test-{uuid.uuid4().hex}:push"


@pytest.fixture
async def two_buses(redis_url: str, channel: str) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    """The push buses of two nodes, in this process."""
    one, two = _bus(redis_url, channel), _bus(redis_url, channel)
    await one.start()
    await two.start()
    yield one, two
    await one.close()
    await two.close()


def _live(bus: RedisBus) -> Subscriber:
    """A subscriber past its snapshot, taking updates."""
    subscriber = bus.subscribe("tester")
    subscriber.needs_snapshot = False
    subscriber.take()
    return subscriber


async def test_the_redis_bus_passes_messages_as_encoded_and_followers_hear_only_other_nodes(
    two_buses: tuple[RedisBus, RedisBus],
) -> None:
    one, two = two_buses
    here, there = _live(one), _live(two)
    heard: dict[str, list[dict[str, Any]]] = {"one": [], "two": [], "picky": []}

    async def follower(name: str, data: dict[str, Any]) -> None:
        heard[name].append(data)

    one.follow("command", functools.partial(follower, "one"))
    two.follow("command", functools.partial(follower, "two"))
    two.follow("command", functools.partial(follower, "picky"), concerns=lambda data: data["id"] == "c2")
    one.publish("command", "c1", {"id": "c1", "state": "queued"})
    async with asyncio.timeout(5):
        await there.ready.wait()
    assert there.take() == [orjson.dumps({"type": "command", "data": {"id": "c1", "state": "queued"}})]
    assert here.take() == [orjson.dumps({"type": "command", "data": {"id": "c1", "state": "queued"}})]
    assert await _within(5, lambda: heard["two"] == [{"id": "c1", "state": "queued"}])
    assert heard["one"] == []  # a node does not follow itself: it acted when it published
    one.publish("command", "c2", {"id": "c2", "state": "queued"})
    assert await _within(5, lambda: len(heard["two"]) == 2)
    assert heard["picky"] == [{"id": "c2", "state": "queued"}]  # only what concerns it

    one.publish_local("stats", "hub", {"node": "one"})
    one.resync_all()  # a node's own readings stay home; a resync reaches every node
    assert await _within(5, lambda: there.needs_snapshot)
    assert there.take() == []
    assert here.needs_snapshot


async def test_updates_that_never_reached_redis_make_the_other_nodes_resync(
    two_buses: tuple[RedisBus, RedisBus],
) -> None:
    one, two = two_buses
    there = _live(two)
    for n in range(101):  # more keys than may wait for Redis (100), without yielding: the last is dropped
        one.publish("score", f"p{n}", {"n": n})
    assert await _within(5, lambda: there.needs_snapshot)
    assert two.stats.resyncs == 1


async def test_a_node_whose_subscription_broke_resyncs_its_dashboards_and_hears_again(
    two_buses: tuple[RedisBus, RedisBus], redis_url: str, channel: str
) -> None:
    one, two = two_buses
    there = _live(two)
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for client in await admin.client_list(_type="pubsub"):
            if client["name"] == channel:  # these two buses' subscriptions, nobody else's
                await admin.client_kill_filter(_id=client["id"])
    finally:
        await admin.aclose()
    assert await _within(5, lambda: there.needs_snapshot)  # what was published meanwhile is lost
    there.needs_snapshot = False
    one.publish("score", "p1", {"n": 1})
    assert await _within(5, lambda: there.take() == [orjson.dumps({"type": "score", "data": {"n": 1}})])


def test_redis_url_must_name_redis_and_its_refusal_does_not_repeat_it(settings: Settings) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**{**settings.model_dump(), "redis_url": "http://user:hunter2@redis.example:6379/0"})
    message = refused.value.errors()[0]["msg"]  # what `agenthub serve` prints
    assert "redis_url must be a redis://, rediss:// or unix:// URL" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("stop", ["kill", "terminate"])
async def test_behind_nginx_a_stopped_node_hands_its_agents_over_and_nothing_acked_is_lost(
    start_node: NodeStarter, settings: Settings, postgres_url: str, tmp_path: Path, stop: str
) -> None:
    """kill: a lost machine (no drain, no goodbye); terminate: SIGTERM, a drain with reconnect hints."""
    nginx_binary = require_tool("nginx")
    fleet = [f"fleet-{n:02d}" for n in range(12)]
    for agent_id in fleet:
        issue_agent(settings.certs_dir, agent_id)
    behind_nginx = {"HUB_LISTEN_TLS": "false", "HUB_TRUSTED_PROXIES": '["127.0.0.1/32"]'}
    a, b = await start_node("node-a", **behind_nginx), await start_node("node-b", **behind_nginx)
    agent_port = free_port()
    proxy = start_nginx(nginx_binary, tmp_path / "nginx", {
        "HUB_AGENT_LISTEN": f"127.0.0.1:{agent_port}", "HUB_OPERATOR_LISTEN": f"127.0.0.1:{free_port()}",
        "HUB_CERTS_DIR": str(settings.certs_dir),
        "HUB_NODES": "".join(f"server {node.url.removeprefix('http://')}; " for node in (a, b)),
    })  # fmt: skip
    store = create_store(Settings(database_url=postgres_url))
    await store.open()
    sources_done = asyncio.Event()
    certs = settings.certs_dir
    sessions = [
        RecordingSession(Tally(agent_id), f"https://127.0.0.1:{agent_port}", certs / f"{agent_id}.pem",
                         certs / f"{agent_id}.key", certs / "ca.pem", tmp_path / f"{agent_id}.spool",
                         reconnection_delay=0.2, reconnection_delay_max=1.0)
        for agent_id in fleet
    ]  # fmt: skip
    runs = [asyncio.create_task(s.run(paced_events(s.tally, 50, sources_done))) for s in sessions]
    try:
        await wait_for_port(agent_port, proxy, tmp_path / "nginx" / "error.log")
        placed = await _nodes_of(store, fleet, lambda nodes: len(nodes) == len(fleet))
        on_a = [agent_id for agent_id, node in placed.items() if node == "node-a"]
        assert on_a, f"nginx pinned every agent to node-b: {placed}"
        assert len(on_a) < len(fleet), f"nginx pinned every agent to node-a: {placed}"

        getattr(a.process, stop)()
        killed_at = time.monotonic()
        moved = await _nodes_of(store, fleet, lambda nodes: set(nodes.values()) == {"node-b"})
        assert time.monotonic() - killed_at < 10, f"agents took too long to move: {moved}"
        await asyncio.sleep(1)  # streaming on node B alone
        sources_done.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*(s.wait_drained() for s in sessions))
        for session in sessions:
            tally = session.tally
            replayed = await store.replay_events((tally.agent_id, 0), 100_000)
            stored = {event["seq"] for agent_id, event in replayed if agent_id == tally.agent_id}
            assert tally.acked <= stored, (
                f"{tally.agent_id}: acked events lost {sorted(tally.acked - stored)[:10]}"
            )
            assert stored == set(range(1, tally.produced + 1)), (
                f"{tally.agent_id}: stored is not what it produced"
            )
    finally:
        for session in sessions:
            await session.stop()
        await asyncio.gather(*runs, return_exceptions=True)
        await store.close()
        proxy.terminate()
        proxy.wait(10)


async def _nodes_of(store: Store, fleet: list[str], done: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """Wait (15 s at most) until the online agents' nodes satisfy `done`; return agent id -> node."""
    nodes: dict[str, str] = {}
    for _ in range(300):
        page = await store.list_agents(status="online", after=None, limit=100)
        nodes = {item["agent_id"]: item["node"] for item in page.items if item["agent_id"] in fleet}
        if done(nodes):
            return nodes
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agents never got there: {nodes}")
