"""Durable state: one interface, backends chosen by configuration (SQLite is the embedded default)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from hub.models import Event
from hub.problems import InvalidInput


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Validated events of one agent, each already encoded for storage (msgpack)."""

    agent_id: str
    events: list[Event]
    bodies: list[bytes]
    received_at: float


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list and the cursor to the next one."""

    items: list[dict[str, Any]]
    cursor: str | None

    def body(self) -> dict[str, Any]:
        """Render in the list shape clients expect."""
        return {
            "data": self.items,
            "pagination": {"cursor": self.cursor, "has_more": self.cursor is not None},
        }


def encode_cursor(key: Sequence[Any]) -> str:
    """Make an opaque cursor from the sort key of the last item on a page."""
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    """Read a cursor made by `encode_cursor`; a tampered one is a clear input error."""
    if not cursor:
        return None
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidInput("cursor is not one this hub issued") from exc
    if not isinstance(key, list) or len(key) != arity:
        raise InvalidInput("cursor is not one this hub issued")
    return key


class Store(Protocol):
    """What the hub needs from durable storage."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def commit_events(self, batch: EventBatch) -> set[int]:
        """Store `batch` durably; return the seqs that were new (the rest were duplicates)."""
        ...

    async def last_seq(self, agent_id: str) -> int: ...
    async def count_events(self, agent_id: str | None = None) -> int: ...
    async def replay_events(self, after: tuple[str, int] | None, limit: int) -> list[tuple[str, Event]]:
        """Return stored events in (agent_id, seq) order after the given key."""
        ...

    async def save_agent(self, agent_id: str, fields: dict[str, Any]) -> None: ...
    async def get_agent(self, agent_id: str) -> dict[str, Any] | None: ...
    async def list_agents(self, *, status: str | None, cursor: str | None, limit: int) -> Page: ...
    async def mark_all_offline(self, reason: str, now: float) -> None: ...

    async def save_processes(self, states: list[dict[str, Any]]) -> None: ...
    async def load_processes(self, agent_id: str) -> list[dict[str, Any]]: ...
    async def replace_scores(self, states: list[dict[str, Any]]) -> None: ...
    async def list_scores(
        self, *, risk_min: float, agent_id: str | None, cursor: str | None, limit: int
    ) -> Page: ...
    async def agent_risk(self, agent_ids: list[str]) -> dict[str, float]: ...

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store new alerts; return them with their ids."""
        ...

    async def list_alerts(
        self, *, agent_id: str | None, severity: str | None, cursor: str | None, limit: int
    ) -> Page: ...

    async def is_revoked(self, fingerprint: str) -> bool: ...
    async def revoke(self, fingerprint: str, *, serial: str, agent_id: str, reason: str) -> None: ...
