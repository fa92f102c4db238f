"""`/ws/live`: the dashboards' push feed (a WebSocket, outside the OpenAPI document)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from hub.api.auth import requires
from hub.api.pagination import MAX_LIMIT
from hub.keys import BUS, PRINCIPAL, REVOKED_TOKENS, SETTINGS, STORE
from hub.push import Access, serve_dashboard

routes = web.RouteTableDef()


@routes.get("/ws/live")
@requires("hub:read")
async def live(request: web.Request) -> web.WebSocketResponse:
    """Send a snapshot, then every score, alert and presence change as it happens."""
    app = request.app

    async def snapshot() -> dict[str, Any]:
        store = app[STORE]
        top = app[SETTINGS].push_snapshot_top
        agents = await store.list_agents(status=None, after=None, limit=MAX_LIMIT)
        scores = await store.list_scores(risk_min=0.01, agent_id=None, after=None, limit=top)
        alerts = await store.list_alerts(agent_id=None, severity=None, after=None, limit=top)
        return {"agents": agents.items, "scores": scores.items, "alerts": alerts.items, "ts": time.time()}

    principal = request[PRINCIPAL]
    access = Access(
        owner=principal.subject,
        valid_until=principal.expires_at,
        still_valid=lambda: _not_revoked(app, principal.token_id),
        recheck_s=app[SETTINGS].token_revocation_cache_s,
    )
    return await serve_dashboard(request, app[BUS], snapshot, access)


async def _not_revoked(app: web.Application, token_id: str) -> bool:
    return not await app[REVOKED_TOKENS].is_revoked(token_id)
