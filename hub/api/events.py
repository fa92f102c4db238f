"""Events: query what agents sent."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.api.bodies import parse_json, read_body
from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.signatures import AGENT_SIGNATURE, SIGNED_AGENT
from hub.api.spec import ApiRoutes
from hub.api.views import StoredEvent
from hub.codec import WirePayload
from hub.keys import INGESTOR, STORE
from hub.models import AGENT_ID_PATTERN, BatchAck, Event, EventKind
from hub.problems import UnsupportedMediaType
from hub.store import EventFilter

api = ApiRoutes("events")


class EventQuery(PageQuery):
    agent_id: str | None = Field(None, pattern=AGENT_ID_PATTERN)
    kind: EventKind | None = None
    pid: int | None = Field(None, ge=0, le=2**31)
    since: float | None = Field(None, description="events with ts >= since (epoch seconds)")
    until: float | None = Field(None, description="events with ts < until (epoch seconds)")


@api.get("/api/v1/events", scope="hub:read", query=EventQuery, response=PageOf[StoredEvent])
async def list_events(request: web.Request, *, query: EventQuery) -> dict[str, Any]:
    """List stored events in (agent_id, seq) order, filtered."""
    filters = EventFilter(
        agent_id=query.agent_id, kind=query.kind, pid=query.pid, since=query.since, until=query.until
    )
    return await paginate(request, query, request.app[STORE].list_events, filters)


class EventBatchBody(TypedDict):
    """What an agent posts: the same batch as the socket's `events` (JSON or msgpack)."""

    events: list[Event]


@api.post("/api/v1/events", scope=AGENT_SIGNATURE, raw_body=EventBatchBody, response=BatchAck)
async def ingest_events(request: web.Request) -> BatchAck:
    """Ingest a batch from an agent that cannot hold a socket (HMAC-signed).

    The batch goes through the same ingest as socket batches (validation, dedupe by
    `(agent_id, seq)`, durable commit before the answer, scoring), and the answer is the
    socket's ack. A batch the hub cannot take now is a 503 problem with Retry-After.
    """
    raw = await read_body(request)
    if request.content_type == "application/msgpack":
        payload: object = raw
    elif request.content_type == "application/json":
        decoded = parse_json(raw)
        payload = WirePayload(decoded, len(raw)) if isinstance(decoded, dict) else decoded
    else:
        raise UnsupportedMediaType(
            f"send the batch as application/json or application/msgpack, not {request.content_type}"
        )
    return await request.app[INGESTOR].ingest(request[SIGNED_AGENT], payload)
