"""Agent liveness: online, late or offline, each change with its reason, stored and pushed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hub.config import Settings
from hub.models import AgentStatus, ConnectInfo, Heartbeat, PresenceReason
from hub.store import Store

log = logging.getLogger(__name__)
Publisher = Callable[[str, str, dict[str, Any]], None]
Disconnector = Callable[[str, PresenceReason], Awaitable[None]]


@dataclass(slots=True)
class _Live:
    sid: str
    status: AgentStatus
    last_heartbeat: float


class Presence:
    """Track each connected agent's liveness and announce every change."""

    def __init__(self, settings: Settings, store: Store, publish: Publisher) -> None:
        self._interval = settings.heartbeat_interval_s
        self._node = settings.node_id
        self._late_after = settings.heartbeat_late_after * self._interval
        self._offline_after = settings.heartbeat_offline_after * self._interval
        self._store = store
        self._publish = publish
        self._live: dict[str, _Live] = {}

    @property
    def connected(self) -> int:
        return len(self._live)

    def sid_of(self, agent_id: str) -> str | None:
        live = self._live.get(agent_id)
        return live.sid if live else None

    async def connect(self, agent_id: str, sid: str, info: ConnectInfo, fingerprint: str) -> None:
        """Record a new connection of `agent_id` as online."""
        now = time.time()
        await self._change(
            agent_id,
            "online",
            "connected",
            now,
            connected_at=now,
            cert_fingerprint=fingerprint,
            node=self._node,
            **info,
        )
        self._live[agent_id] = _Live(sid, "online", now)  # only once the store has it

    async def heartbeat(self, agent_id: str, sid: str, beat: Heartbeat) -> dict[str, float]:
        """Record a heartbeat and return its ack."""
        now = time.time()
        live = self._live.get(agent_id)
        if live is not None and live.sid == sid:
            live.last_heartbeat = now
            if live.status != "online":
                live.status = "online"
                await self._change(agent_id, "online", "heartbeat", now, heartbeat=dict(beat))
            else:
                await self._store.save_agent(agent_id, {"last_seen": now, "heartbeat": dict(beat)})
                self._publish(
                    "agent",
                    agent_id,
                    {"agent_id": agent_id, "status": "online", "heartbeat": dict(beat), "ts": now},
                )
        return {"server_time": now, "next_in_s": self._interval}

    async def disconnect(self, agent_id: str, sid: str, reason: PresenceReason) -> None:
        """Record that the socket `sid` of `agent_id` closed; a superseded socket changes nothing."""
        live = self._live.get(agent_id)
        if live is None or live.sid != sid:
            return
        del self._live[agent_id]
        await self._change(agent_id, "offline", reason, time.time())

    async def watch(self, disconnect: Disconnector) -> None:
        """Mark agents late, then offline, when heartbeats stop; runs until cancelled."""
        while True:
            await asyncio.sleep(min(1.0, self._interval / 4))
            try:
                await self._check(disconnect)
            except Exception:  # the store failed: liveness must keep being watched
                log.exception("liveness check failed; will retry")

    async def _check(self, disconnect: Disconnector) -> None:
        now = time.time()
        for agent_id, live in list(self._live.items()):
            silent = now - live.last_heartbeat
            if silent > self._offline_after:
                log.warning("agent %s missed its heartbeats for %.1fs: disconnecting", agent_id, silent)
                await disconnect(live.sid, "missed_heartbeats")
            elif silent > self._late_after and live.status == "online":
                live.status = "late"
                await self._change(agent_id, "late", "missed_heartbeats", now)

    async def _change(
        self, agent_id: str, status: AgentStatus, reason: PresenceReason, now: float, **fields: Any
    ) -> None:
        log.info("agent %s is %s (%s)", agent_id, status, reason)
        record = {
            "status": status,
            "status_reason": reason,
            "status_changed_at": now,
            "last_seen": now,
            **fields,
        }
        await self._store.save_agent(agent_id, record)
        self._publish(
            "agent", agent_id, {"agent_id": agent_id, "status": status, "reason": reason, "ts": now}
        )
