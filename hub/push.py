"""Dashboard push: the bus that fans out scores, alerts and presence, and `/ws/live`.

A message is encoded once per publish and offered to every subscriber. Each subscriber
keeps only the latest message per key (one per process, agent or alert), so a slow
dashboard gets coalesced updates and never slows the publisher; one that falls too far
behind is re-sent a snapshot instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)
SnapshotSource = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class PushStats:
    """Counters over every subscriber, for operators."""

    published: int = 0
    coalesced: int = 0
    resyncs: int = 0


class Subscriber:
    """One dashboard connection's pending updates."""

    def __init__(self, max_pending: int, stats: PushStats) -> None:
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

    def __init__(self, *, max_pending: int) -> None:
        self._subscribers: set[Subscriber] = set()
        self._max_pending = max_pending
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

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self._max_pending, self.stats)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)


async def serve_dashboard(
    request: web.Request, bus: PushBus, snapshot: SnapshotSource
) -> web.WebSocketResponse:
    """Run one `/ws/live` connection: snapshot first, then live updates until it closes."""
    ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=64 * 1024)
    await ws.prepare(request)
    subscriber = bus.subscribe()
    sender = asyncio.create_task(_send_updates(ws, subscriber, snapshot))
    try:
        async for message in ws:  # dashboards only listen; reading detects the close
            if message.type == WSMsgType.ERROR:
                break
    finally:
        bus.unsubscribe(subscriber)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return ws


async def _send_updates(ws: web.WebSocketResponse, subscriber: Subscriber, snapshot: SnapshotSource) -> None:
    while not ws.closed:
        await subscriber.ready.wait()
        if subscriber.needs_snapshot:
            # Updates arriving while the snapshot is read are queued and sent after it.
            subscriber.needs_snapshot = False
            subscriber.take()
            data = await snapshot()
            await ws.send_frame(orjson.dumps({"type": "snapshot", "data": data}), WSMsgType.TEXT)
            continue
        for message in subscriber.take():
            await ws.send_frame(message, WSMsgType.TEXT)
