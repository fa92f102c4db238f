"""Prometheus metrics on the main listener, for scrapers that hold a token."""

from __future__ import annotations

from aiohttp import web

from hub.api.spec import ApiRoutes
from hub.keys import METRICS

api = ApiRoutes("system")


# hub:read, as /api/v1/stats (the same numbers): a scraper needs no write or admin power.
@api.get("/api/v1/metrics", scope="hub:read")
async def metrics(request: web.Request) -> web.Response:
    """Every hub metric in the Prometheus text format (OpenMetrics when asked for in Accept).

    Scrapers that cannot send a bearer token scrape the separate listener instead
    (`HUB_METRICS_LISTEN`, `/metrics`).
    """
    return await request.app[METRICS].response(request)
