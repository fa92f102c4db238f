"""Agent liveness: online, late or offline, each change with its reason, stored and pushed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hub.config import Settings
from hub.models import AgentStatus, ConnectInfo, Heartbeat, PresenceReason, Publisher
from hub.notices import presence_notices
from hub.store import Store
from hub.turns import Turns

log = logging.getLogger(__name__)
Disconnector = Callable[[str, PresenceReason], Awaitable[None]]
_IDENTITY = ("hostname", "agent_version", "platform", "node")
_PRUNE_EVERY_S = 60.0  # heartbeat history is pruned this often: a cheap, indexed delete


@dataclass(slots=True)
class _Live:
    sid: str
    status: AgentStatus
    last_heartbeat: float
    connected_at: float  # with the node, what the store knows this connection by


class Presence:
    """Track each connected agent's liveness and announce every change.

    An agent's changes run one at a time, each storing its change before making it in
    memory, so memory never claims what the store lacks. A disconnect is the exception:
    the socket is gone whatever the store says, so an `offline` the store refused is kept
    and retried by `watch`.
    """

    def __init__(self, settings: Settings, store: Store, publish: Publisher) -> None:
        self._interval = settings.heartbeat_interval_s
        self._node = settings.node_id
        self._late_after = settings.heartbeat_late_after * self._interval
        self._offline_after = settings.heartbeat_offline_after * self._interval
        self._store = store
        self._publish = publish
        self._live: dict[str, _Live] = {}
        self._turns = Turns()  # one change of an agent at a time, in the order they came
        # agent id -> the offline to store: reason, when, and the connection it ends (its connected_at)
        self._unsaved: dict[str, tuple[PresenceReason, float, float]] = {}
        self._history_s = settings.heartbeat_history_s
        self._handover_grace_s = settings.handover_grace_s
        self._pruned_at = 0.0
        self._swept_at = 0.0

    @property
    def connected(self) -> int:
        return len(self._live)

    def sid_of(self, agent_id: str) -> str | None:
        live = self._live.get(agent_id)
        return live.sid if live else None

    def connection(self, agent_id: str) -> tuple[str, float] | None:
        """The agent's connection here as the store knows it: (node, connected_at)."""
        live = self._live.get(agent_id)
        return (self._node, live.connected_at) if live else None

    async def superseded(self, agent_id: str) -> str | None:
        """The agent's socket here if the store names another connection of it: it reconnected elsewhere."""
        live = self._live.get(agent_id)
        if live is None:
            return None
        stored = await self._store.get_agent(agent_id)
        if stored is None or (stored["node"], stored["connected_at"]) == (self._node, live.connected_at):
            return None
        return live.sid if self._live.get(agent_id) is live else None  # not replaced here meanwhile

    async def connect(self, agent_id: str, sid: str, info: ConnectInfo, fingerprint: str) -> str | None:
        """Record a new connection of `agent_id` as online; return the socket it replaces, if any."""
        async with self._turns(agent_id):
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
            previous = self._live.get(agent_id)
            self._live[agent_id] = _Live(sid, "online", now, connected_at=now)
            self._unsaved.pop(agent_id, None)  # an older offline the store missed is out of date
        return previous.sid if previous else None

    async def heartbeat(self, agent_id: str, sid: str, beat: Heartbeat) -> dict[str, float]:
        """Record a heartbeat and return its ack."""
        now = time.time()
        live = self._live.get(agent_id)
        if live is not None and live.sid == sid:
            live.last_heartbeat = now
            if live.status == "online":
                notices = presence_notices(agent_id, "online", "restored", now)
                connection = (self._node, live.connected_at)
                change = {"agent_id": agent_id, "status": "online", "heartbeat": dict(beat), "ts": now}
                if await self._store.save_heartbeat(
                    agent_id, dict(beat), now=now, connection=connection, notices=notices
                ):
                    log.warning(
                        "agent %s is online again (restored): it was marked offline meanwhile", agent_id
                    )
                    change["reason"] = "restored"
                self._publish("agent", agent_id, change)
            else:  # if the store fails, the agent's next heartbeat tries again
                await self._restatus(agent_id, live, "online", "heartbeat", now, heartbeat=dict(beat))
        return {"server_time": now, "next_in_s": self._interval}

    async def disconnect(self, agent_id: str, sid: str, reason: PresenceReason) -> None:
        """Record that the socket `sid` of `agent_id` closed; a superseded socket changes nothing.

        Never raises: an `offline` the store refuses is retried by `watch`.
        """
        async with self._turns(agent_id):
            live = self._live.get(agent_id)
            if live is None or live.sid != sid:
                return
            del self._live[agent_id]
            self._unsaved[agent_id] = (reason, time.time(), live.connected_at)
            await self._save_offline(agent_id)

    async def watch(self, disconnect: Disconnector) -> None:
        """Mark agents late, then offline, when heartbeats stop; prune old heartbeats; run until cancelled."""
        while True:
            await asyncio.sleep(min(1.0, self._interval / 4))
            try:
                await self._check(disconnect)
                await self._sweep_orphans()
                await self._prune_history()
            except Exception:  # the store failed: liveness must keep being watched
                log.exception("liveness check failed; will retry")

    async def _check(self, disconnect: Disconnector) -> None:
        for agent_id in list(self._unsaved):
            async with self._turns(agent_id):
                await self._save_offline(agent_id)
        now = time.time()
        for agent_id, live in list(self._live.items()):
            silent = now - live.last_heartbeat
            if silent > self._offline_after:
                log.warning("agent %s missed its heartbeats for %.1fs: disconnecting", agent_id, silent)
                await disconnect(live.sid, "missed_heartbeats")
            elif silent > self._late_after and live.status == "online":
                await self._restatus(agent_id, live, "late", "missed_heartbeats", now)

    async def _sweep_orphans(self) -> None:
        """Mark offline the agents of a node that died (kill -9, power loss) and never came back.

        Their heartbeats stopped reaching the store; connected agents' nodes would have marked
        them within `offline_after`, so twice that leaves each node the first word on its own.
        """
        now = time.time()
        if now - self._swept_at < self._offline_after:
            return
        self._swept_at = now
        reason: PresenceReason = "missed_heartbeats"
        swept = await self._store.mark_silent_offline(
            before=now - 2 * self._offline_after,
            now=now,
            notices=lambda agent_id: presence_notices(agent_id, "offline", reason, now),
        )
        for agent_id in swept:
            log.warning("agent %s of a node that went away is offline (%s)", agent_id, reason)
            self._publish(
                "agent", agent_id, {"agent_id": agent_id, "status": "offline", "reason": reason, "ts": now}
            )

    async def _prune_history(self) -> None:
        now = time.time()
        if now - self._pruned_at >= _PRUNE_EVERY_S:
            self._pruned_at = now  # a failed prune waits its turn too: the next one catches up
            await self._store.prune_heartbeats(now - self._history_s)

    async def _restatus(
        self,
        agent_id: str,
        live: _Live,
        status: AgentStatus,
        reason: PresenceReason,
        now: float,
        **fields: Any,
    ) -> None:
        """Change the status of the connection `live`, unless another change came first."""
        async with self._turns(agent_id):
            if self._live.get(agent_id) is live and live.status != status:
                await self._change(agent_id, status, reason, now, if_connected_at=live.connected_at, **fields)
                live.status = status

    async def _save_offline(self, agent_id: str) -> None:
        """Store the `offline` that `agent_id` is waiting for, if any; the caller holds its turn."""
        unsaved = self._unsaved.get(agent_id)
        if unsaved is None:  # a connection since then stored a newer status
            return
        reason, now, connected_at = unsaved
        try:
            await self._change(agent_id, "offline", reason, now, if_connected_at=connected_at)
        except Exception as exc:
            log.warning("storing that agent %s is offline failed (%s); will retry", agent_id, exc)
            return
        del self._unsaved[agent_id]

    async def _change(
        self,
        agent_id: str,
        status: AgentStatus,
        reason: PresenceReason,
        now: float,
        *,
        if_connected_at: float | None = None,
        **fields: Any,
    ) -> None:
        """Store and announce a status; with `if_connected_at`, only while that connection is the agent's."""
        record = {
            "status": status,
            "status_reason": reason,
            "status_changed_at": now,
            "last_seen": now,
            **fields,
        }
        # Webhook deliveries are queued in the same transaction as the status they announce.
        # A connection's later changes apply only while it is the stored one: the agent may have
        # moved to another node since, which now holds its status.
        connection = None if if_connected_at is None else (self._node, if_connected_at)
        grace = self._handover_grace_s
        notices = presence_notices(agent_id, status, reason, now, handover_grace_s=grace)
        # A connect may end a handover: webhooks then hear of neither (hub.notices).
        returning = grace if grace and reason == "connected" else None
        if not await self._store.save_agent(
            agent_id, record, notices, connection=connection, returning_within_s=returning
        ):
            log.info("agent %s has connected elsewhere since: its old socket here is %s", agent_id, status)
            return
        log.info("agent %s is %s (%s)", agent_id, status, reason)
        # A connect carries who the agent is: a page that never had it in a snapshot learns it here.
        identity = {name: fields[name] for name in _IDENTITY if name in fields}
        change = {"agent_id": agent_id, "status": status, "reason": reason, "ts": now}
        self._publish("agent", agent_id, change | identity)
