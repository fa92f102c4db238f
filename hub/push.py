"""Dashboard push: the bus that fans out scores, alerts and presence, and `/ws/live`.

A message is encoded once per publish and offered to every subscriber. Each subscriber
keeps only the latest message per key (one per process, agent or alert), so a slow
dashboard gets coalesced updates and never slows the publisher; one that falls too far
behind is re-sent a snapshot instead.

One node fans out in process (`LocalBus`). Several nodes share a Redis (`RedisBus`): a
message goes to this node's dashboards at once and, as the same encoded bytes, to every
other node over Redis pub/sub, where it meets that node's dashboards under the same rules.
Services on other nodes may follow a kind of message (a command's changes, a revocation):
that is how work reaches the node that holds an agent's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as redis
from aiohttp import WSCloseCode, WSMsgType, web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from hub.config import Settings
from hub.problems import RateLimited

log = logging.getLogger(__name__)
SnapshotSource = Callable[[], Awaitable[dict[str, Any]]]
# Called with a message's `data` when another node publishes its kind.
Follower = Callable[[dict[str, Any]], Awaitable[object]]
# Whether a message's `data` concerns a follower at all: asked before a task is started for it.
Concerns = Callable[[dict[str, Any]], bool]
_BATCH_MAX = 500  # messages in one batched frame at most
CatchUp = Callable[[], Awaitable[object]]
_RETRY_MAX_S = 5.0  # longest pause between attempts to reach Redis


@dataclass(slots=True)
class PushStats:
    """Counters over every subscriber, for operators."""

    published: int = 0
    coalesced: int = 0
    resyncs: int = 0
    cutoffs: int = 0  # dashboards closed because they stopped reading


class Subscriber:
    """One dashboard connection's pending updates."""

    def __init__(self, max_pending: int, stats: PushStats, owner: str) -> None:
        self.owner = owner
        self._pending: dict[str, bytes] = {}
        self._max_pending = max_pending
        self._stats = stats
        self.ready = asyncio.Event()
        self.ready.set()  # the first thing to send is a snapshot
        self.needs_snapshot = True
        self.going_away = asyncio.Event()  # the node is stopping: close, the dashboard reconnects
        self.sending_since: float | None = None  # loop time the frame being sent was handed over

    def offer(self, key: str, message: bytes) -> None:
        if self.needs_snapshot:
            return  # the coming snapshot includes this update
        if key in self._pending:
            self._stats.coalesced += 1
        elif len(self._pending) >= self._max_pending:
            self.resync()
            return
        self._pending[key] = message
        self.ready.set()

    def resync(self) -> None:
        """Drop what is pending and send a fresh snapshot instead."""
        self._pending.clear()
        self.needs_snapshot = True
        self._stats.resyncs += 1
        self.ready.set()

    def take(self) -> list[bytes]:
        pending, self._pending = self._pending, {}
        self.ready.clear()
        return list(pending.values())


class PushBus(Protocol):
    """The one seam every publisher uses: in process (`LocalBus`) or across nodes (`RedisBus`)."""

    stats: PushStats
    send_timeout_s: float

    @property
    def subscriber_count(self) -> int:
        """Dashboards subscribed on this node."""
        ...

    def publish(self, kind: str, key: str, data: dict[str, Any]) -> None:
        """Offer `data` as a `kind` message to every dashboard of every node, coalesced by `key`."""
        ...

    def publish_local(self, kind: str, key: str, data: dict[str, Any]) -> None:
        """Offer `data` to this node's dashboards only (a reading of this node, such as `stats`)."""
        ...

    def resync_all(self) -> None:
        """Send every dashboard of every node a fresh snapshot (after all scores changed at once)."""
        ...

    def follow(self, kind: str, follower: Follower, *, concerns: Concerns | None = None) -> None:
        """Call `follower` with the data of each `kind` message another node publishes that `concerns` it."""
        ...

    def on_missed(self, catch_up: CatchUp) -> None:
        """Call `catch_up` whenever messages from other nodes may have been lost (Redis was away)."""
        ...

    def subscribe(self, owner: str) -> Subscriber:
        """Add a subscriber for `owner`; raise `RateLimited` past the caps (each costs every publish)."""
        ...

    def unsubscribe(self, subscriber: Subscriber) -> None: ...

    def send_away(self) -> None:
        """Close this node's dashboards (it is stopping); they reconnect, behind nginx to another node."""
        ...

    async def start(self) -> None:
        """Begin exchanging messages with other nodes, if there are any."""
        ...

    async def close(self) -> None: ...


def push_bus(settings: Settings) -> PushBus:
    """Build the bus the settings ask for: over Redis when `redis_url` is set, else in process."""
    limits: dict[str, Any] = {
        "max_pending": settings.push_max_pending,
        "max_subscribers": settings.push_max_dashboards,
        "max_per_owner": settings.push_max_dashboards_per_principal,
        "send_timeout_s": settings.push_send_timeout_s,
    }
    if settings.redis_url is None:
        return LocalBus(**limits)
    return RedisBus(settings.redis_url.get_secret_value(), channel=f"{settings.redis_prefix}:push", **limits)


class LocalBus:
    """In-process fan-out to every dashboard subscribed on this node."""

    def __init__(
        self, *, max_pending: int, max_subscribers: int, max_per_owner: int, send_timeout_s: float
    ) -> None:
        self.send_timeout_s = send_timeout_s
        self._subscribers: set[Subscriber] = set()
        self._max_pending = max_pending
        self._max_subscribers = max_subscribers
        self._max_per_owner = max_per_owner
        self._owners: Counter[str] = Counter()
        self.stats = PushStats()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, key: str, data: dict[str, Any]) -> None:
        """Offer `data` as a `kind` message to every subscriber, coalesced by `key`."""
        self.publish_local(kind, key, data)

    def publish_local(self, kind: str, key: str, data: dict[str, Any]) -> None:
        if self._subscribers:  # nobody listens: spare the encoding
            self._offer(f"{kind}:{key}", _frame(kind, data))

    def resync_all(self) -> None:
        """Send every subscriber a fresh snapshot (after all scores changed at once)."""
        for subscriber in self._subscribers:
            subscriber.resync()

    def follow(self, kind: str, follower: Follower, *, concerns: Concerns | None = None) -> None:
        """Do nothing: no other node publishes here."""

    def on_missed(self, catch_up: CatchUp) -> None:
        """Do nothing: nothing from another node can be missed."""

    def subscribe(self, owner: str) -> Subscriber:
        """Add a subscriber for `owner`; raise `RateLimited` past the caps (each costs every publish)."""
        if len(self._subscribers) >= self._max_subscribers:
            raise RateLimited(f"this hub serves {self._max_subscribers} dashboards at most", retry_after_s=5)
        if self._owners[owner] >= self._max_per_owner:
            raise RateLimited(f"at most {self._max_per_owner} dashboards per principal", retry_after_s=5)
        subscriber = Subscriber(self._max_pending, self.stats, owner)
        self._subscribers.add(subscriber)
        self._owners[owner] += 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            self._owners[subscriber.owner] -= 1
            if not self._owners[subscriber.owner]:
                del self._owners[subscriber.owner]

    def send_away(self) -> None:
        for subscriber in self._subscribers:
            subscriber.going_away.set()

    async def start(self) -> None:
        """Do nothing: the bus is ready as built."""

    async def close(self) -> None:
        """Do nothing: there is no connection to close."""

    def _offer(self, slot: str, message: bytes) -> None:
        if not self._subscribers:
            return
        for subscriber in self._subscribers:
            subscriber.offer(slot, message)
        self.stats.published += 1


class RedisBus(LocalBus):
    """This node's dashboards, plus every other node's over one Redis pub/sub channel.

    On the channel a message is a JSON header line `[node, kind, key]`, then the encoded
    dashboard message itself, which no node decodes again to pass on; `[node, null, null]`
    asks every other node to resync its dashboards. Publishing never waits for Redis: updates
    queue, coalesced by key like a subscriber's, and a writer task sends them in pipelines.
    While Redis is away they wait and go out when it answers; updates of keys beyond
    `max_unsent` are dropped, made good by a resync of every other node once Redis answers.
    A node whose subscription broke resyncs its own dashboards when it is back.
    """

    def __init__(self, url: str, *, channel: str, max_unsent: int = 10_000, **limits: Any) -> None:
        """Use the Redis at `url`; hold at most `max_unsent` keys' updates while Redis is slow or away."""
        super().__init__(**limits)
        # No retries inside redis-py: a subscription it renewed quietly would hide what was missed.
        # Named for operators (CLIENT LIST): which hub's bus a connection belongs to.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=5, client_name=channel, retry=Retry(NoBackoff(), 0)
        )
        self._channel = channel
        self._node = uuid.uuid4().hex  # node ids may repeat (a hostname): this one is unique
        self._unsent: dict[str, bytes] = {}  # slot -> message with its header, latest per slot
        self._max_unsent = max_unsent
        self._lost = False  # something never reached Redis: the other nodes must resync
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._followers: dict[str, list[tuple[Follower, Concerns | None]]] = {}
        self._missed_handlers: list[CatchUp] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def publish(self, kind: str, key: str, data: dict[str, Any]) -> None:
        frame = _frame(kind, data)  # encoded once: for this node's dashboards and every other node
        slot = f"{kind}:{key}"
        self._offer(slot, frame)
        self._send(slot, orjson.dumps([self._node, kind, key]) + b"\n" + frame)

    def resync_all(self) -> None:
        super().resync_all()
        self._send("", orjson.dumps([self._node, None, None]) + b"\n")

    def follow(self, kind: str, follower: Follower, *, concerns: Concerns | None = None) -> None:
        self._followers.setdefault(kind, []).append((follower, concerns))

    def on_missed(self, catch_up: CatchUp) -> None:
        self._missed_handlers.append(catch_up)

    async def start(self) -> None:
        """Start the reader and writer; wait a little for the subscription, so nothing early is missed."""
        self._spawn(self._read(), "push-bus-reader")
        self._spawn(self._write(), "push-bus-writer")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # not wait_for: it can swallow a cancellation on 3.11
                await self._subscribed.wait()
        if not self._subscribed.is_set():
            log.warning("Redis is not answering: other nodes' dashboard updates arrive once it does")

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose()

    def _send(self, slot: str, message: bytes) -> None:
        if slot not in self._unsent and len(self._unsent) >= self._max_unsent:
            self._lost = True
            return
        self._unsent[slot] = message
        self._wake.set()

    async def _write(self) -> None:
        pause = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._unsent = self._unsent, {}
            if self._lost:
                self._lost = False
                batch[""] = orjson.dumps([self._node, None, None]) + b"\n"
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for message in batch.values():
                        pipe.publish(self._channel, message)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("cannot publish dashboard updates to Redis (%s); retrying in %.1f s", exc, pause)
                # Sent again, unless newer updates of the same keys came meanwhile: a message may
                # then arrive twice, which changes nothing (each is the latest state of its key).
                self._unsent = batch | self._unsent
                self._wake.set()
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_S)
            else:
                pause = 0.1

    async def _read(self) -> None:
        pause, broke = 0.1, False
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    if broke:  # what other nodes published meanwhile is lost: start afresh
                        super().resync_all()
                        self._missed()
                    self._subscribed.set()
                    pause = 0.1
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._receive(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("lost the Redis subscription for dashboards (%s); retrying in %.1f s", exc, pause)
                broke = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_S)

    def _receive(self, raw: bytes) -> None:
        # Whatever arrives is checked: one malformed message must not end the reader, and
        # followers only take it as a hint to read the store (README: Redis and trust).
        head, _, frame = raw.partition(b"\n")
        try:
            node, kind, key = orjson.loads(head)
            if not all(part is None or isinstance(part, str) for part in (node, kind, key)):
                raise TypeError("a header of strings")
            if node == self._node:  # this node's dashboards had it when it was published
                return
            message = None if kind is None else orjson.loads(frame)
            if message is not None and (
                message.get("type") != kind or not isinstance(message.get("data"), dict)
            ):
                raise TypeError("a dashboard message")
        except (ValueError, TypeError, AttributeError) as exc:  # not from a hub node
            log.warning("ignored a message on %s that no hub node sent (expected %s)", self._channel, exc)
            return
        if message is None:  # a node lost updates: start afresh
            super().resync_all()
            self._missed()
            return
        self._offer(f"{kind}:{key}", frame)
        data = message["data"]
        for follower, concerns in self._followers.get(kind, ()):
            # Most messages concern no follower (every heartbeat of every other node's agents):
            # those cost no task.
            if concerns is None or _concerned(concerns, kind, data):
                self._spawn(_follow(follower, kind, data), f"follow-{kind}")

    def _missed(self) -> None:
        for handler in self._missed_handlers:
            self._spawn(_catch_up(handler), "bus-catch-up")

    def _spawn(self, work: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _catch_up(catch_up: CatchUp) -> None:
    try:
        await catch_up()
    except Exception:  # the periodic checks make it good later
        log.exception("catching up with what other nodes did failed")


def _concerned(concerns: Concerns, kind: str, data: dict[str, Any]) -> bool:
    try:
        return concerns(data)
    except Exception:  # one odd message must not stop the bus
        log.exception("checking a %s message from another node failed", kind)
        return False


async def _follow(follower: Follower, kind: str, data: dict[str, Any]) -> None:
    try:
        await follower(data)
    except Exception:  # one failed follower must not stop the bus
        log.exception("following a %s message from another node failed", kind)


def _frame(kind: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": kind, "data": data})


@dataclass(frozen=True, slots=True)
class Access:
    """Whose dashboard a connection is, and until when it may stay open."""

    owner: str
    valid_until: float  # epoch seconds: the token's expiry
    still_valid: Callable[[], Awaitable[bool]]  # False once the token is revoked
    recheck_s: float


async def serve_dashboard(
    request: web.Request, bus: PushBus, snapshot: SnapshotSource, access: Access, *, batched: bool = False
) -> web.WebSocketResponse:
    """Run one `/ws/live` connection: snapshot first, then live updates until it closes.

    The connection closes (1008, policy violation) when its token expires or is revoked.
    `batched`: each frame is a JSON array of the messages pending then, rather than one message.
    """
    subscriber = bus.subscribe(access.owner)  # before the upgrade: past the caps it is a 429
    ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=64 * 1024)
    try:
        await ws.prepare(request)
        tasks = [
            asyncio.create_task(_send_updates(ws, subscriber, snapshot, batched)),
            asyncio.create_task(_cut_off_when_stuck(request, subscriber, bus)),
            asyncio.create_task(_end_with_access(ws, access)),
            asyncio.create_task(_end_when_going_away(ws, subscriber)),
        ]
        try:
            async for message in ws:  # dashboards only listen; reading detects the close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        bus.unsubscribe(subscriber)
    return ws


async def _cut_off_when_stuck(request: web.Request, subscriber: Subscriber, bus: PushBus) -> None:
    """Close the connection once one send has waited `send_timeout_s`: the dashboard stopped reading."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(bus.send_timeout_s / 10)
        since = subscriber.sending_since
        if since is not None and loop.time() - since >= bus.send_timeout_s:
            # What it would get is coalesced already, so cut it off.
            bus.stats.cutoffs += 1
            log.warning(
                "dashboard of %s stopped reading for %.0f s: closed", subscriber.owner, bus.send_timeout_s
            )
            if request.transport is not None:
                request.transport.abort()
            return


async def _end_when_going_away(ws: web.WebSocketResponse, subscriber: Subscriber) -> None:
    await subscriber.going_away.wait()
    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the hub node is stopping")


async def _end_with_access(ws: web.WebSocketResponse, access: Access) -> None:
    while not ws.closed:
        remaining = access.valid_until - time.time()
        if remaining <= 0 or not await access.still_valid():
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"the token expired or was revoked")
            return
        await asyncio.sleep(min(access.recheck_s, remaining))


async def _send_updates(
    ws: web.WebSocketResponse, subscriber: Subscriber, snapshot: SnapshotSource, batched: bool
) -> None:
    loop = asyncio.get_running_loop()
    while not ws.closed:
        await subscriber.ready.wait()
        if subscriber.needs_snapshot:
            # Updates arriving while the snapshot is read are queued and sent after it.
            subscriber.needs_snapshot = False
            subscriber.take()
            frames = [orjson.dumps({"type": "snapshot", "data": await snapshot()})]
        else:
            frames = subscriber.take()
        if batched:  # one frame, one write: the cost of a delivery is shared by all it carries
            frames = [
                b"[" + b",".join(frames[i : i + _BATCH_MAX]) + b"]" for i in range(0, len(frames), _BATCH_MAX)
            ]
        for frame in frames:
            # A send returns at once unless the socket's buffer is full. No timer a frame (wait_for
            # made a task, and a loop turn, of each): `_cut_off_when_stuck` watches this instead.
            subscriber.sending_since = loop.time()
            await ws.send_frame(frame, WSMsgType.TEXT)
        subscriber.sending_since = None
