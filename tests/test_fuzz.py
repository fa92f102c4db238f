"""Hostile input: properties of the batch decoder and validator, hostile frames over real sockets.

Every case ends in an answer (an ack, or an error ack) or a closed socket: never a crash,
never unbounded memory, never a change to what is already stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.app import NAMESPACE_KEY
from hub.codec import SocketJson, decode_batch
from hub.config import Settings
from hub.keys import INGESTOR, PRESENCE
from hub.models import EVENT_ADAPTER, EVENT_KINDS, Event
from hub.problems import HubError
from tests.conftest import (
    AgentConn,
    ConnectAgent,
    RunningHub,
    client_ssl,
    make_events,
    open_agent,
    start_hub,
)
from tests.test_certificates import wait_for

# Derandomized: CI runs the same examples every time; no example database in the checkout.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_EVENTS = Settings.model_fields["max_batch_events"].default
MAX_BYTES = Settings.model_fields["max_batch_bytes"].default
FRAME_LIMIT = Settings.model_fields["max_frame_bytes"].default
ANSWER_S = 2.0  # a hub answers in milliseconds; silence this long is a hung socket
CLAIM = 0xFFFF_FFF0  # a msgpack length claiming almost 4 GiB
MiB = 1024 * 1024

# --- strategies ---------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
SCALARS = st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats() | st.text(max_size=12)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
# What msgpack can carry besides JSON: bin, ext and timestamp types, and byte-string keys.
PACKABLE_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999))
)
PACKABLE = st.recursive(
    PACKABLE_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=16,
)
FIELDS = list(Event.__annotations__)


@st.composite
def hostile_events(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[Any, Any]:
    """A valid event, then a few fields dropped, replaced by anything, or added unknown."""
    event: dict[Any, Any] = {
        "seq": draw(st.integers(1, 40)),  # a small range: duplicates within and across batches
        "ts": draw(st.floats(0, 2e9)),
        "kind": draw(st.sampled_from(EVENT_KINDS)),
        "pid": draw(st.integers(0, 5000)),
    }
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS) | st.text(max_size=10))
        if draw(st.booleans()):
            event.pop(name, None)
        else:
            event[name] = draw(values)
    return event


def batches(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"events": st.lists(hostile_events(values), max_size=8)})


def nested(depth: int, *, opener: bytes, leaf: bytes) -> bytes:
    """Containers `depth` deep, built as text so no encoder's recursion limit applies."""
    return opener * depth + leaf


def _claims(head: bytes) -> bytes:
    return head + struct.pack(">I", CLAIM)


# Headers claiming gigabytes with a few bytes behind them: bin32, str32, array32, map32, ext32.
CLAIMS = [
    _claims(b"\xc6") + b"abc",
    _claims(b"\xdb") + b"abc",
    _claims(b"\xdd") + b"\x01",
    _claims(b"\xdf") + b"\x01\x01",
    _claims(b"\xc9") + b"\x05abc",
]
EVENTS_KEY = msgpack.packb("events")
HOSTILE_BYTES = (
    st.binary(max_size=64)
    | st.sampled_from(CLAIMS)
    | st.sampled_from(CLAIMS).map(lambda claim: b"\x81" + EVENTS_KEY + claim)
    | st.integers(1, 5).map(lambda n: b"\x81" + EVENTS_KEY + nested(10**n, opener=b"\x91", leaf=b"\xc0"))
    | st.sampled_from([b"\xa2\xff\xfe", b"\x81\xa6events\x91\x81\xa4path\xa2\xc3\x28"])  # invalid UTF-8 str
)


@st.composite
def mutated_msgpack(draw: st.DrawFn) -> bytes:
    """A msgpack batch with bytes flipped, cut short or appended."""
    data = bytearray(msgpack.packb(draw(batches(PACKABLE))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def json_text(value: Any) -> str:
    """JSON as a hostile client may write it: NaN, Infinity and integers of any width."""
    return json.dumps(value)


PAYLOADS = (
    batches(JSON_LIKE) | JSON_LIKE | batches(PACKABLE).map(msgpack.packb) | mutated_msgpack() | HOSTILE_BYTES
)


# --- properties: the decoder and the validator -------------------------------------------------


@FUZZ
@given(payload=PAYLOADS | st.text(max_size=32))
def test_decode_batch_returns_an_event_list_or_raises_a_hub_error(payload: Any) -> None:
    try:
        events = decode_batch(payload, max_events=MAX_EVENTS, max_bytes=MAX_BYTES)
    except HubError:
        return
    assert isinstance(events, list)
    assert len(events) <= MAX_EVENTS


@FUZZ
@given(text=batches(JSON_LIKE).map(json_text) | JSON_LIKE.map(json_text) | st.text(max_size=32))
def test_socket_json_decodes_a_packet_or_refuses_it_as_invalid(text: str) -> None:
    # python-socketio hands `loads` the text after the packet header; refusing it is a ValueError.
    with contextlib.suppress(ValueError):
        SocketJson.loads(f'["events",{text}]')


@FUZZ
@given(payload=PAYLOADS | batches(JSON_LIKE).map(lambda b: _socket_decoded(json_text(b))))
async def test_every_payload_gets_a_consistent_ack_or_a_hub_error(
    hub: RunningHub, caplog: pytest.LogCaptureFixture, payload: Any
) -> None:
    before = await _stored(hub)
    try:
        raw = decode_batch(payload, max_events=MAX_EVENTS, max_bytes=MAX_BYTES)
    except HubError as refusal:
        with pytest.raises(type(refusal)):
            await hub.app[INGESTOR].ingest("agent-1", payload)
        raw, ack = None, None
    else:
        ack = await hub.app[INGESTOR].ingest("agent-1", payload)
    await hub.settle()  # scoring takes the accepted events too: it must not fail on them
    after = await _stored(hub)

    assert {key: after[key] for key in before} == before  # nothing stored changes
    if ack is None or raw is None:
        assert after == before
    else:
        assert ack["accepted"] + ack["duplicates"] + len(ack["rejected"]) == len(raw)
        indexes = [rejection["index"] for rejection in ack["rejected"]]
        assert indexes == sorted(set(indexes))
        assert all(0 <= index < len(raw) for index in indexes)
        assert len(after) == len(before) + ack["accepted"]
    for event in after.values():
        EVENT_ADAPTER.validate_python(event)  # what is stored is always a valid event
    assert not _errors(caplog)


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records logged at ERROR or above: hostile input is the client's error, never the hub's."""
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def _socket_decoded(text: str) -> Any:
    """The payload python-socketio hands the handler for `text`, or the text if it is not JSON."""
    try:
        return SocketJson.loads(f'["events",{text}]')[1]
    except ValueError:
        return text


async def _stored(hub: RunningHub) -> dict[tuple[str, int], Any]:
    rows = await hub.store.replay_events(None, 1_000_000)
    return {(agent_id, event["seq"]): event for agent_id, event in rows}


@settings(FUZZ, max_examples=60)
@given(batch=batches(PACKABLE))
async def test_a_stock_client_gets_an_answer_to_every_batch(
    hub: RunningHub, agents: Agents, batch: dict[str, Any]
) -> None:
    agent = await agents.stock("agent-1")
    count = len(batch["events"])
    _assert_answers(await agent.send(msgpack.packb(batch)), count)
    if not any(isinstance(v, bytes | msgpack.ExtType | msgpack.Timestamp) for v in _leaves(batch)):
        _assert_answers(await agent.send(batch), count)  # the same batch as JSON text
    assert agent.sio.connected


def _assert_answers(answer: dict[str, Any], count: int) -> None:
    """Assert `answer` is an error ack, or an ack accounting for each of `count` events."""
    if "error" not in answer:
        assert answer["accepted"] + answer["duplicates"] + len(answer["rejected"]) == count


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value, *(leaf for item in value.values() for leaf in _leaves(item))]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


# --- hostile frames over the real socket --------------------------------------------------------

CLOSED = "closed"


class TextBytes(bytes):
    """Bytes sent as a TEXT frame: how a client sends invalid UTF-8 where text belongs."""


Frame = str | bytes


@dataclass
class RawSocket:
    """An agent writing Engine.IO and Socket.IO packets by hand, to send what a stock client cannot."""

    session: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    sid: str  # the Engine.IO session id

    async def send(self, frames: list[Frame]) -> None:
        for frame in frames:
            if self.ws.closed:
                return
            if isinstance(frame, TextBytes):
                await self.ws.send_frame(bytes(frame), aiohttp.WSMsgType.TEXT)
            elif isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_str(frame)

    async def answer(self, ack_id: int) -> Any:
        """Return the hub's ack to `ack_id`, or CLOSED once the hub closes the socket."""
        prefix = f"43/agent,{ack_id}"
        packet = await self.expect(prefix)
        return packet if packet == CLOSED else json.loads(packet[len(prefix) :])[0]

    async def expect(self, *prefixes: str) -> str:
        """Return the next packet starting with one of `prefixes`, or CLOSED once the socket is."""
        async with asyncio.timeout(ANSWER_S):
            while True:
                message = await self.ws.receive()
                if message.type is aiohttp.WSMsgType.BINARY:
                    continue
                if message.type is not aiohttp.WSMsgType.TEXT:
                    return CLOSED  # closing, closed or a protocol error: the socket is gone
                text: str = message.data
                if text == "2":  # Engine.IO ping
                    await self.ws.send_str("3")
                elif text == "1" or text.startswith("41/agent,"):  # Engine.IO close, Socket.IO disconnect
                    return CLOSED
                elif text.startswith(prefixes):
                    return text

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


@dataclass
class Agents:
    """Agents of one hub: stock python-socketio clients and hand-written raw sockets."""

    hub: RunningHub
    connect_agent: ConnectAgent
    opened: list[RawSocket]
    stocks: dict[str, AgentConn]

    async def stock(self, agent_id: str) -> AgentConn:
        """Return a connected stock client of `agent_id`, reused while it stays connected."""
        conn = self.stocks.get(agent_id)
        if conn is None or not conn.sio.connected:
            conn = self.stocks[agent_id] = await self.connect_agent(agent_id)
        return conn

    async def raw(self, agent_id: str) -> RawSocket:
        """Open a raw socket with `agent_id`'s certificate, join `/agent`, wait for hello."""
        raw = await self.open(agent_id)
        await raw.send(["40/agent,{}"])
        assert (await raw.expect('42/agent,["hello"')) != CLOSED
        return raw

    async def open(self, agent_id: str | None) -> RawSocket:
        """Open an Engine.IO WebSocket, with `agent_id`'s certificate or none, joining no namespace."""
        certs = self.hub.certs
        key = (certs / f"{agent_id}.pem", certs / f"{agent_id}.key") if agent_id else (None, None)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl(certs / "ca.pem", *key))
        )
        ws = await session.ws_connect(f"{self.hub.url}/socket.io/?EIO=4&transport=websocket")
        opened = await ws.receive_str(timeout=10)  # Engine.IO open: 0{"sid": ...}
        raw = RawSocket(session, ws, json.loads(opened[1:])["sid"])
        self.opened.append(raw)
        return raw


@pytest.fixture
async def agents(hub: RunningHub, connect_agent: ConnectAgent) -> AsyncIterator[Agents]:
    made = Agents(hub, connect_agent, [], {})
    yield made
    for raw in made.opened:
        await raw.close()


def event_frame(ack_id: int, body: str, *, name: str = "events") -> str:
    """A Socket.IO EVENT packet on `/agent` asking for an ack, with `body` as its JSON argument."""
    return f'42/agent,{ack_id}["{name}",{body}]'


def binary_event(announced: int = 1, placeholder: int = 0) -> str:
    """A Socket.IO BINARY_EVENT header announcing `announced` attachments to follow."""
    return f'45{announced}-/agent,1["events",{{"_placeholder":true,"num":{placeholder}}}]'


def _one_event(**fields: Any) -> str:
    return json_text({"events": [{**make_events(1, 1)[0], **fields}]})


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass(frozen=True)
class Attack:
    frames: list[Frame]
    expect: str  # "ack": a normal ack; "error": an error ack with this code; CLOSED
    code: str = ""


ATTACKS = {
    "json nested 100,000 deep": pytest.param(Attack([event_frame(1, _deep_json(100_000))], CLOSED)),
    "json syntax error": pytest.param(Attack([event_frame(1, '{"events": [nope]}')], CLOSED)),
    "json NaN": pytest.param(Attack([event_frame(1, _one_event(ts=math.nan))], CLOSED)),
    "json huge integers": Attack([event_frame(1, _one_event(seq=10**30, pid=-(10**40)))], "ack"),
    "invalid UTF-8 in a text frame": Attack([TextBytes(b'42/agent,1["events","\xff\xfe"]')], CLOSED),
    "frame over max_frame_bytes": Attack([event_frame(1, '"' + "a" * FRAME_LIMIT + '"')], CLOSED),
    **{
        f"msgpack header claiming 4 GiB ({name})": Attack([binary_event(), claim], "error", "invalid_input")
        for name, claim in zip(["bin32", "str32", "array32", "map32", "ext32"], CLAIMS, strict=True)
    },
    "msgpack header claiming 4 GiB inside the batch": Attack(
        [binary_event(), b"\x81" + EVENTS_KEY + CLAIMS[2]], "error", "invalid_input"
    ),
    "msgpack nested 100,000 deep": Attack(
        [binary_event(), b"\x81" + EVENTS_KEY + nested(100_000, opener=b"\x91", leaf=b"\xc0")],
        "error",
        "invalid_input",
    ),
    "msgpack invalid UTF-8": Attack(
        [binary_event(), b"\x81" + EVENTS_KEY + b"\xa2\xff\xfe"], "error", "invalid_input"
    ),
    "attachment never arrives, text follows": pytest.param(
        Attack([binary_event(), event_frame(2, '{"events": []}')], CLOSED)
    ),
    "binary event announcing no attachment": pytest.param(Attack([binary_event(0), b"\x80"], CLOSED)),
    "placeholder out of range": pytest.param(Attack([binary_event(1, placeholder=5), b"\x80"], CLOSED)),
    "unknown event name": pytest.param(
        Attack([event_frame(1, "{}", name="delete_everything")], "error", "invalid_input"),
    ),
    "reserved event name 'disconnect'": pytest.param(
        Attack([event_frame(1, '"client disconnect"', name="disconnect")], CLOSED)
    ),
    "reserved event name 'connect'": pytest.param(Attack([event_frame(1, "{}", name="connect")], CLOSED)),
    "event name not a string": pytest.param(Attack(["42/agent,1[5,{}]"], CLOSED)),
    "event packet not a list": pytest.param(Attack(['42/agent,1{"a":1}'], CLOSED)),
    "event packet an empty list": pytest.param(Attack(["42/agent,1[]"], CLOSED)),
    "events with extra arguments": pytest.param(
        Attack([event_frame(1, '{"events": []}, {}, {}')], "error", "invalid_input"),
    ),
    "not an Engine.IO packet": Attack(["x marks the spot"], CLOSED),
    "a packet type that is a digit, not an ASCII one": Attack(["\u0663"], CLOSED),
    "a packet type Engine.IO does not have": Attack(["7"], CLOSED),
    "empty text frame": Attack([""], CLOSED),
    "an Engine.IO packet only a server sends (NOOP)": Attack(["6", event_frame(1, _one_event())], "ack"),
}


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
async def test_a_hostile_frame_gets_an_answer_or_a_closed_socket_and_harms_nothing(
    hub: RunningHub, agents: Agents, attack: Attack, caplog: pytest.LogCaptureFixture
) -> None:
    bystander = await agents.stock("agent-2")
    assert (await bystander.send({"events": make_events(1, 20)}))["accepted"] == 20
    assert (await (await agents.stock("agent-1")).send({"events": make_events(1, 5)}))["accepted"] == 5
    await agents.stocks.pop("agent-1").close()
    stored = await _stored(hub)
    attacker = await agents.raw("agent-1")

    answer = await _attack(attacker, attack.frames)

    if attack.expect == CLOSED:
        assert answer == CLOSED
        await _wait_until_forgotten(hub, attacker)
    elif attack.expect == "error":
        assert answer["error"]["code"] == attack.code
    else:
        assert "error" not in answer
        _assert_answers(answer, 1)
    # The hub keeps serving: the bystander, and the attacker's own agent once it behaves.
    assert (await bystander.send({"events": make_events(21, 5)}))["accepted"] == 5
    again = await agents.stock("agent-1")
    assert again.hello.result()["last_seq"] == 5
    assert (await again.send({"events": make_events(6, 1)}))["accepted"] == 1
    after = await _stored(hub)
    assert {key: after[key] for key in stored} == stored
    assert len(after) == len(stored) + 6
    # Hostile input is the client's error, not the hub's: no traceback for each such frame.
    assert not _errors(caplog)


@dataclass
class MemoryWatch:
    """Python memory the hub (in this process) allocates while watched: the peak, and what it keeps."""

    peak: int = 0
    kept: int = 0

    @classmethod
    @contextlib.contextmanager
    def watching(cls) -> Iterator[MemoryWatch]:
        # tracemalloc, not RSS: the allocator keeps freed pages, and the clients share this process.
        watch = cls()
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            yield watch
        finally:
            current, peak = tracemalloc.get_traced_memory()
            watch.peak, watch.kept = peak - base, current - base
            if started:
                tracemalloc.stop()


async def _attack(attacker: RawSocket, frames: list[Frame]) -> Any:
    """Send `frames`; return the hub's answer to ack id 1, within bounded memory."""
    with MemoryWatch.watching() as memory:
        await attacker.send(frames)
        try:
            answer = await attacker.answer(1)
        except TimeoutError:
            pytest.fail(f"the hub neither answered nor closed the socket within {ANSWER_S} s")
    # The largest frame is 2 MiB; a header claiming gigabytes must not be believed.
    assert memory.peak < 64 * MiB
    assert memory.kept < 4 * MiB
    return answer


async def _wait_until_forgotten(hub: RunningHub, raw: RawSocket) -> None:
    """Wait until the hub dropped the closed socket and anything it held for it."""
    server = hub.app[NAMESPACE_KEY].server
    assert await wait_for(
        lambda: hub.app[PRESENCE].sid_of("agent-1") is None and raw.sid not in server.eio.sockets, 5
    )
    assert raw.sid not in server._binary_packet


async def test_announcing_endless_attachments_cannot_pile_up_memory(hub: RunningHub, agents: Agents) -> None:
    attacker = await agents.raw("agent-1")
    chunk = b"\x00" * MiB
    with MemoryWatch.watching() as memory:
        await attacker.send([binary_event(announced=9999)])
        for _ in range(64):  # upstream keeps every one of them, waiting for the 9999th
            await attacker.send([chunk])
        answer = await attacker.answer(1)
    assert memory.kept < 8 * MiB
    assert answer == CLOSED
    bystander = await agents.stock("agent-2")
    assert (await bystander.send({"events": make_events(1, 3)}))["accepted"] == 3


async def test_an_attachment_that_never_arrives_holds_one_packet_until_the_socket_goes(
    hub: RunningHub, agents: Agents
) -> None:
    # Nothing tells the hub the attachment will not come: like the reference server it waits,
    # holding one packet for that socket only, and lets go of it when the socket closes.
    server = hub.app[NAMESPACE_KEY].server
    attacker = await agents.raw("agent-1")
    await attacker.send([binary_event()])
    bystander = await agents.stock("agent-2")
    assert (await bystander.send({"events": make_events(1, 3)}))["accepted"] == 3
    assert len(server._binary_packet) == 1
    await attacker.close()
    assert await wait_for(lambda: not server._binary_packet, 5)


# Engine.IO and Socket.IO packets as a client may write them: each part of the header valid or not.
SOCKETIO_PACKETS = st.builds(
    "4{}{}{}{}{}".format,
    st.sampled_from("0123456789x"),  # Socket.IO type
    st.sampled_from(["", "1-", "0-", "99999999999-"]),  # binary attachments announced
    st.sampled_from(["", "/agent,", "/agent", "/,", "/elsewhere,"]),  # namespace
    st.sampled_from(["", "1", "0", str(2**70), "-1"]),  # ack id
    st.sampled_from(['["events",{"events":[]}]', '["heartbeat",{}]', '["hello"]', "{}", '"x"', "", "[1]"])
    | st.text(max_size=16),  # data
)
ENGINEIO_PACKETS = st.builds(str.__add__, st.sampled_from("0123456789"), st.text(max_size=16))
# Over long-polling, a binary message travels as text: "b" and its base64.
BASE64_MESSAGES = st.binary(max_size=16).map(lambda data: "b" + base64.b64encode(data).decode())
CLIENT_FRAMES = SOCKETIO_PACKETS | ENGINEIO_PACKETS | BASE64_MESSAGES | st.text(max_size=8)


@settings(FUZZ, max_examples=40)  # each example connects and disconnects: two durable commits
@given(frames=st.lists(CLIENT_FRAMES | st.binary(max_size=16), min_size=1, max_size=3))
async def test_any_frames_a_client_writes_harm_nothing(
    hub: RunningHub, agents: Agents, caplog: pytest.LogCaptureFixture, frames: list[Frame]
) -> None:
    caplog.clear()  # one example's records: the fixture lives across them
    bystander = await agents.stock("agent-2")
    attacker = await agents.raw("agent-1")
    await attacker.send(frames)
    await asyncio.sleep(0.05)  # what the frame makes the hub do, it does now
    await attacker.close()
    await _wait_until_forgotten(hub, attacker)
    assert "server_time" in await bystander.send({"ts": 1.0}, event="heartbeat")
    assert not _errors(caplog)


@settings(FUZZ, max_examples=40)
@given(frames=st.lists(CLIENT_FRAMES, min_size=1, max_size=3))
async def test_any_long_polling_body_a_client_writes_harms_nothing(
    hub: RunningHub, agents: Agents, caplog: pytest.LogCaptureFixture, frames: list[str]
) -> None:
    caplog.clear()  # one example's records: the fixture lives across them
    bystander = await agents.stock("agent-2")
    async with _polling_agent(hub) as polling:
        assert await polling.post("\x1e".join(frames).encode()) in {200, 400}
    assert "server_time" in await bystander.send({"ts": 1.0}, event="heartbeat")
    assert not _errors(caplog)


async def test_a_packet_after_the_session_ended_in_one_long_polling_body_is_refused(
    hub: RunningHub, caplog: pytest.LogCaptureFixture
) -> None:
    async with _polling_agent(hub) as polling:
        assert await polling.post(b"40/agent,{}") == 200
        async with polling.session.get(polling.url) as polled:
            assert '"hello"' in await polled.text()
        # The broken Socket.IO packet ends the session; upstream then failed on what followed (a
        # 500, and a traceback in the log).
        assert await polling.post(b"4x\x1e0") == 400
    assert not _errors(caplog)


@dataclass
class PollingAgent:
    """agent-1 speaking Engine.IO over long-polling, by hand."""

    session: aiohttp.ClientSession
    url: str  # the session's polling URL
    sid: str

    async def post(self, body: bytes) -> int:
        """Send `body` as a payload; return the answer's status."""
        async with asyncio.timeout(ANSWER_S), self.session.post(self.url, data=body) as answer:
            return answer.status


@contextlib.asynccontextmanager
async def _polling_agent(hub: RunningHub) -> AsyncIterator[PollingAgent]:
    """Open agent-1's Engine.IO long-polling session."""
    context = client_ssl(hub.certs / "ca.pem", hub.certs / "agent-1.pem", hub.certs / "agent-1.key")
    polling = f"{hub.url}/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(polling) as opened:
            sid = json.loads((await opened.text())[1:])["sid"]
        yield PollingAgent(session, f"{polling}&sid={sid}", sid)


CONNECT_ATTACKS = {
    "auth nested 100,000 deep": pytest.param("40/agent," + _deep_json(100_000)),
    "auth not JSON": pytest.param('40/agent,{"agent_version": nope}'),
    "an unknown namespace": "40/elsewhere,{}",
    "the default namespace": pytest.param("40"),
}


@pytest.mark.parametrize("packet", list(CONNECT_ATTACKS.values()), ids=list(CONNECT_ATTACKS))
async def test_a_hostile_connect_is_refused_or_closed(hub: RunningHub, agents: Agents, packet: str) -> None:
    attacker = await agents.open("agent-1")
    await attacker.send([packet])
    answer = await attacker.expect("40", "44")  # CONNECT (admitted) or CONNECT_ERROR
    assert answer == CLOSED or answer.startswith("44")
    assert hub.app[PRESENCE].sid_of("agent-1") is None
    bystander = await agents.stock("agent-2")
    assert (await bystander.send({"events": make_events(1, 3)}))["accepted"] == 3


async def test_without_a_certificate_a_socket_joins_nothing_and_holds_nothing(
    hub: RunningHub, agents: Agents
) -> None:
    # TLS lets a client without a certificate in (operators use the same listener): Socket.IO must not.
    stranger = await agents.open(None)
    await stranger.send(["40"])
    assert (await stranger.expect("40", "44")).startswith("44")
    with MemoryWatch.watching() as memory:
        await stranger.send(['459999-["x",{"_placeholder":true,"num":0}]'])
        for _ in range(16):
            await stranger.send([b"\x00" * MiB])
        assert await stranger.expect("4") == CLOSED
    assert memory.kept < 4 * MiB


async def test_hostile_long_polling_requests_leave_the_hub_serving(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # A small frame limit: an over-limit body the client can finish sending before it reads the 400.
    small = settings.model_copy(update={"max_batch_bytes": 1000, "max_frame_bytes": 2000})
    runner, hub = await start_hub(small)
    bodies = [
        (b"", 200),  # no packet at all
        (b'40/agent,{"x":"\xff\xfe"}', 400),  # invalid UTF-8
        (b"4" + b"x" * 2000, 400),  # over the limit; upstream answers it only once the client polls again
        (b"x marks the spot", 400),
        (b"7", 400),  # a packet type Engine.IO does not have
        (b"40/agent,{}\x1e\x1e3", 400),  # an empty packet between two
        (b"b!!not base64", 400),
        (b"1\x1e5", 400),  # a packet after CLOSE
        (b"3\x1e2", 400),  # PING: a server's packet
    ]
    try:
        for body, status in bodies:
            async with _polling_agent(hub) as polling:
                assert await polling.post(body) == status, body
            if status == 400:  # and the session is closed
                assert polling.sid not in hub.app[NAMESPACE_KEY].server.eio.sockets
        bystander = await open_agent(hub, "agent-2")
        assert (await bystander.send({"events": make_events(1, 3)}))["accepted"] == 3
        await bystander.close()
        assert not _errors(caplog)
    finally:
        await runner.cleanup()
