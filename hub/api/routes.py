"""HTTP handlers: health, agents, scores, alerts, and the `/ws/live` dashboard feed."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from hub import __version__
from hub.api.auth import requires
from hub.keys import BUS, INGESTOR, PRESENCE, SCORING, SETTINGS, STARTED_AT, STORE
from hub.models import SEVERITY_ORDER
from hub.problems import InvalidInput, NotFound, Unavailable
from hub.push import serve_dashboard

routes = web.RouteTableDef()
_MAX_LIMIT = 500


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIMIT:
        raise InvalidInput(f"limit must be a whole number from 1 to {_MAX_LIMIT}, got {raw!r}")
    return int(raw)


def _number(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {raw!r}") from None


@routes.get("/api/v1/health")
@requires(None)
async def health(request: web.Request) -> web.Response:
    """Say whether the hub can serve: the database answers."""
    try:
        await request.app[STORE].ping()
    except Exception as exc:
        raise Unavailable(f"database unreachable: {exc}", retry_after_ms=5000) from exc
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "database": "ok",
            "uptime_s": round(time.time() - request.app[STARTED_AT], 1),
            "agents_connected": request.app[PRESENCE].connected,
        }
    )


@routes.get("/api/v1/agents")
@requires("hub:read")
async def list_agents(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "online", "late", "offline"):
        raise InvalidInput(f"status must be online, late or offline, got {status!r}")
    store = request.app[STORE]
    page = await store.list_agents(status=status, cursor=request.query.get("cursor"), limit=_limit(request))
    risk = await store.agent_risk([item["agent_id"] for item in page.items])
    for item in page.items:
        item["risk"] = risk.get(item["agent_id"], 0.0)
    return web.json_response(page.body())


@routes.get("/api/v1/agents/{agent_id}")
@requires("hub:read")
async def get_agent(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    store = request.app[STORE]
    agent = await store.get_agent(agent_id)
    if agent is None:
        raise NotFound(f"no agent {agent_id!r}")
    agent["risk"] = (await store.agent_risk([agent_id])).get(agent_id, 0.0)
    return web.json_response(agent)


@routes.get("/api/v1/scores")
@requires("hub:read")
async def list_scores(request: web.Request) -> web.Response:
    page = await request.app[STORE].list_scores(
        risk_min=_number(request, "risk_min", 0.0),
        agent_id=request.query.get("agent_id"),
        cursor=request.query.get("cursor"),
        limit=_limit(request),
    )
    return web.json_response(page.body())


@routes.get("/api/v1/alerts")
@requires("hub:read")
async def list_alerts(request: web.Request) -> web.Response:
    severity = request.query.get("severity")
    if severity is not None and severity not in SEVERITY_ORDER:
        raise InvalidInput(f"severity must be one of {', '.join(SEVERITY_ORDER)}, got {severity!r}")
    page = await request.app[STORE].list_alerts(
        agent_id=request.query.get("agent_id"),
        severity=severity,
        cursor=request.query.get("cursor"),
        limit=_limit(request),
    )
    return web.json_response(page.body())


@routes.get("/api/v1/stats")
@requires("hub:read")
async def stats(request: web.Request) -> web.Response:
    """Counters a dashboard or an operator checks first."""
    ingestor, scoring, bus = request.app[INGESTOR], request.app[SCORING], request.app[BUS]
    return web.json_response(
        {
            "events_accepted": ingestor.accepted,
            "events_duplicate": ingestor.duplicates,
            "events_rejected": ingestor.rejected,
            "events_scored": scoring.scored,
            "scoring_backlog": scoring.backlog,
            "agents_connected": request.app[PRESENCE].connected,
            "dashboards": bus.subscriber_count,
            "push_published": bus.stats.published,
            "push_coalesced": bus.stats.coalesced,
            "push_resyncs": bus.stats.resyncs,
        }
    )


@routes.get("/ws/live")
@requires("hub:read")
async def live(request: web.Request) -> web.WebSocketResponse:
    app = request.app

    async def snapshot() -> dict[str, Any]:
        store = app[STORE]
        top = app[SETTINGS].push_snapshot_top
        agents = await store.list_agents(status=None, cursor=None, limit=_MAX_LIMIT)
        scores = await store.list_scores(risk_min=0.01, agent_id=None, cursor=None, limit=top)
        alerts = await store.list_alerts(agent_id=None, severity=None, cursor=None, limit=top)
        return {
            "agents": agents.items,
            "scores": scores.items,
            "alerts": alerts.items,
            "ts": time.time(),
        }

    return await serve_dashboard(request, app[BUS], snapshot)
