"""Agents: presence, last heartbeat and risk."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.params import AgentPath
from hub.api.spec import ApiRoutes
from hub.api.views import AgentView, HeartbeatPoint
from hub.keys import INGESTOR, PRINCIPAL, SETTINGS, STORE
from hub.problems import NotFound

api = ApiRoutes("agents")


class AgentQuery(PageQuery):
    status: Literal["online", "late", "offline"] | None = None
    risk_min: float = Field(0.0, ge=0, le=100, description="only agents whose risk is at least this")


@api.get("/api/v1/agents", scope="hub:read", query=AgentQuery, response=PageOf[AgentView])
async def list_agents(request: web.Request, *, query: AgentQuery) -> dict[str, Any]:
    """List agents by id, with status and risk (the highest score of their live processes)."""
    return await paginate(
        request, query, request.app[STORE].list_agents, status=query.status, risk_min=query.risk_min
    )


@api.get("/api/v1/agents/{agent_id}", scope="hub:read", path_params=AgentPath, response=AgentView)
async def get_agent(request: web.Request, *, path: AgentPath) -> dict[str, Any]:
    """Get one agent: status, last heartbeat (CPU, memory, disk), version, host, hub node and risk."""
    agent = await request.app[STORE].get_agent(path.agent_id)
    if agent is None:
        raise NotFound(f"no agent {path.agent_id!r} has connected to this hub")
    return agent


class HeartbeatQuery(PageQuery):
    since: float | None = Field(None, description="heartbeats received at or after this (epoch seconds)")
    until: float | None = Field(None, description="heartbeats received before this (epoch seconds)")


@api.get(
    "/api/v1/agents/{agent_id}/heartbeats",
    scope="hub:read",
    path_params=AgentPath,
    query=HeartbeatQuery,
    response=PageOf[HeartbeatPoint],
)
async def list_heartbeats(request: web.Request, *, path: AgentPath, query: HeartbeatQuery) -> dict[str, Any]:
    """List an agent's recent heartbeats (CPU, memory, disk...), oldest first, by hub receive time.

    The hub keeps `heartbeat_history_s` of them.
    """
    store = request.app[STORE]
    if await store.get_agent(path.agent_id) is None:
        raise NotFound(f"no agent {path.agent_id!r} has connected to this hub")
    return await paginate(
        request, query, store.list_heartbeats, path.agent_id, since=query.since, until=query.until
    )


class SigningSecret(TypedDict):
    agent_id: str
    secret: str
    created_at: float


@api.post(
    "/api/v1/agents/{agent_id}/signing-secret",
    scope="hub:admin",
    path_params=AgentPath,
    response=SigningSecret,
    status=201,
    no_store=True,
)
async def create_signing_secret(request: web.Request, *, path: AgentPath) -> SigningSecret:
    """Issue (or rotate) the secret an agent signs HTTP event posts with; shown only now.

    The agent need not have connected before: this is how agents that cannot hold a socket
    are enrolled. A rotated secret replaces the old one at once.
    """
    secret = secrets.token_urlsafe(32)
    await request.app[STORE].set_agent_secret(path.agent_id, secret)
    return SigningSecret(agent_id=path.agent_id, secret=secret, created_at=time.time())


@api.delete("/api/v1/agents/{agent_id}/signing-secret", scope="hub:admin", path_params=AgentPath, status=204)
async def delete_signing_secret(request: web.Request, *, path: AgentPath) -> None:
    """Withdraw an agent's signing secret: its signed posts are refused from now on."""
    if not await request.app[STORE].set_agent_secret(path.agent_id, None):
        raise NotFound(f"agent {path.agent_id!r} has no signing secret")


class Throttle(TypedDict):
    """Whether an agent's events are held to a low rate; the other fields are null when not."""

    agent_id: str
    throttled: bool
    events_per_s: float | None
    reason: str | None
    throttled_at: float | None
    throttled_by: str | None  # an operator, or "anomaly-detector" on an anomalous burst


class ThrottleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events_per_s: float | None = Field(
        None,
        gt=0,
        le=1e9,
        description="events a second it may send; default anomaly_throttle_events_per_s",
    )
    reason: str = Field("", max_length=500, description="why, for the next person who looks")


def _throttle_view(agent_id: str, record: dict[str, Any] | None) -> Throttle:
    if record is None:
        return Throttle(agent_id=agent_id, throttled=False, events_per_s=None, reason=None,
                        throttled_at=None, throttled_by=None)  # fmt: skip
    return Throttle(
        agent_id=agent_id,
        throttled=True,
        events_per_s=record["events_per_s"],
        reason=record["reason"],
        throttled_at=record["throttled_at"],
        throttled_by=record["throttled_by"],
    )


@api.get("/api/v1/agents/{agent_id}/throttle", scope="hub:read", path_params=AgentPath, response=Throttle)
async def get_throttle(request: web.Request, *, path: AgentPath) -> Throttle:
    """Say whether an agent's events are throttled, since when, by whom and why."""
    return _throttle_view(path.agent_id, await request.app[STORE].get_throttle(path.agent_id))


@api.post(
    "/api/v1/agents/{agent_id}/throttle",
    scope="hub:admin",
    path_params=AgentPath,
    body=ThrottleBody,
    response=Throttle,
)
async def throttle_agent(request: web.Request, *, path: AgentPath, body: ThrottleBody) -> Throttle:
    """Throttle an agent's events (or change its rate) until an operator lifts it.

    Batches over the rate are answered `overloaded`; the agent keeps them and retries.
    """
    rate = body.events_per_s or request.app[SETTINGS].anomaly_throttle_events_per_s
    record = await request.app[INGESTOR].throttles.throttle(
        path.agent_id, events_per_s=rate, reason=body.reason, by=request[PRINCIPAL].subject
    )
    return _throttle_view(path.agent_id, record)


@api.delete("/api/v1/agents/{agent_id}/throttle", scope="hub:admin", path_params=AgentPath, status=204)
async def lift_throttle(request: web.Request, *, path: AgentPath) -> None:
    """Lift an agent's throttle: its batches are taken at its usual quota again."""
    if not await request.app[INGESTOR].throttles.lift(path.agent_id):
        raise NotFound(f"agent {path.agent_id!r} is not throttled")
