"""`/ws/live`: the dashboards' push feed (a WebSocket, outside the OpenAPI document)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from hub.api.auth import requires
from hub.api.pagination import MAX_LIMIT
from hub.keys import BUS, PRINCIPAL, REVOKED_TOKENS, SESSION, SESSIONS, SETTINGS, STORE
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
        scores = await store.list_scores(risk_min=0.01, agent_id=None, after=None, limit=top, live_only=True)
        alerts = await store.list_alerts(agent_id=None, severity=None, after=None, limit=top)
        return {
            # The agents a page shows first, up to MAX_LIMIT; the counts cover them all.
            "agents": await store.agents_by_attention(MAX_LIMIT),
            "agent_counts": await store.count_agents(),
            "scores": scores.items,
            "alerts": alerts.items,
            "ts": time.time(),
        }

    principal = request[PRINCIPAL]
    access = Access(
        owner=principal.subject,
        valid_until=principal.expires_at,
        still_valid=_still_valid(request),
        recheck_s=app[SETTINGS].token_revocation_cache_s,
    )
    # `?batch=1`: frames are arrays of messages (the pages ask for it; PROTOCOL.md clients do not).
    batched = request.query.get("batch") == "1"
    return await serve_dashboard(request, app[BUS], snapshot, access, batched=batched)


def _still_valid(request: web.Request) -> Callable[[], Awaitable[bool]]:
    # A page's dashboard lasts as long as its session (signed out anywhere: closed); a token's
    # as long as it is not revoked.
    app = request.app
    session = request.get(SESSION)
    if session is not None:
        return lambda: app[SESSIONS].alive(session.id_hash)
    token_id = request[PRINCIPAL].token_id

    async def not_revoked() -> bool:
        return not await app[REVOKED_TOKENS].is_revoked(token_id)

    return not_revoked
