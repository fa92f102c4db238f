"""Dashboard push: the bus that fans out scores, alerts and presence, and `/ws/live`.

A message is encoded once per publish and offered to every subscriber. Each subscriber
keeps only the latest message per key (one per process, agent or alert), so a slow
dashboard gets coalesced updates and never slows the publisher; one that falls too far
behind is re-sent a snapshot instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from hub.problems import RateLimited

log = logging.getLogger(__name__)
SnapshotSource = Callable[[], Awaitable[dict[str, Any]]]


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


class PushBus:
    """In-process fan-out to every subscribed dashboard."""

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
        if not self._subscribers:
            return
        message = orjson.dumps({"type": kind, "data": data})
        slot = f"{kind}:{key}"
        for subscriber in self._subscribers:
            subscriber.offer(slot, message)
        self.stats.published += 1

    def resync_all(self) -> None:
        """Send every subscriber a fresh snapshot (after all scores changed at once)."""
        for subscriber in self._subscribers:
            subscriber.resync()

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


@dataclass(frozen=True, slots=True)
class Access:
    """Whose dashboard a connection is, and until when it may stay open."""

    owner: str
    valid_until: float  # epoch seconds: the token's expiry
    still_valid: Callable[[], Awaitable[bool]]  # False once the token is revoked
    recheck_s: float


async def serve_dashboard(
    request: web.Request, bus: PushBus, snapshot: SnapshotSource, access: Access
) -> web.WebSocketResponse:
    """Run one `/ws/live` connection: snapshot first, then live updates until it closes.

    The connection closes (1008, policy violation) when its token expires or is revoked.
    """
    subscriber = bus.subscribe(access.owner)  # before the upgrade: past the caps it is a 429
    ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=64 * 1024)
    try:
        await ws.prepare(request)
        tasks = [
            asyncio.create_task(_send_updates(request, ws, subscriber, snapshot, bus)),
            asyncio.create_task(_end_with_access(ws, access)),
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


async def _end_with_access(ws: web.WebSocketResponse, access: Access) -> None:
    while not ws.closed:
        remaining = access.valid_until - time.time()
        if remaining <= 0 or not await access.still_valid():
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"the token expired or was revoked")
            return
        await asyncio.sleep(min(access.recheck_s, remaining))


async def _send_updates(
    request: web.Request,
    ws: web.WebSocketResponse,
    subscriber: Subscriber,
    snapshot: SnapshotSource,
    bus: PushBus,
) -> None:
    while not ws.closed:
        await subscriber.ready.wait()
        if subscriber.needs_snapshot:
            # Updates arriving while the snapshot is read are queued and sent after it.
            subscriber.needs_snapshot = False
            subscriber.take()
            frames = [orjson.dumps({"type": "snapshot", "data": await snapshot()})]
        else:
            frames = subscriber.take()
        for frame in frames:
            try:
                await asyncio.wait_for(ws.send_frame(frame, WSMsgType.TEXT), bus.send_timeout_s)
            except TimeoutError:
                # It stopped reading: what it would get is coalesced already, so cut it off.
                bus.stats.cutoffs += 1
                log.warning(
                    "dashboard of %s stopped reading for %.0f s: closed", subscriber.owner, bus.send_timeout_s
                )
                if request.transport is not None:
                    request.transport.abort()
                return
