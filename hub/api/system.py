"""The hub itself: health, counters, and the API's own description."""

from __future__ import annotations

import logging
import time

import aiohttp_jinja2
from aiohttp import web
from pydantic import BaseModel, Field

from hub import __version__
from hub.api.spec import ApiRoutes
from hub.api.views import Health, Stats
from hub.jobs import JobView
from hub.keys import BUS, INGESTOR, JOBS, OPENAPI, PRESENCE, SCORING, STARTED_AT, STORE
from hub.problems import NotFound, Unavailable

log = logging.getLogger(__name__)
api = ApiRoutes("system")


@api.get("/api/v1/health", scope=None, response=Health)
async def health(request: web.Request) -> Health:
    """Say whether the hub can serve: the database answers (503 when it does not)."""
    try:
        await request.app[STORE].ping()
    except Exception as exc:
        log.warning("health check: the database does not answer: %s", exc)  # not told to callers
        raise Unavailable("database unreachable", retry_after_ms=5000) from exc
    return Health(
        status="ok",
        version=__version__,
        database="ok",
        uptime_s=round(time.time() - request.app[STARTED_AT], 1),
        agents_connected=request.app[PRESENCE].connected,
    )


@api.get("/api/v1/stats", scope="hub:read", response=Stats)
async def stats(request: web.Request) -> Stats:
    """Counters a dashboard or an operator checks first."""
    ingestor, scoring, bus = request.app[INGESTOR], request.app[SCORING], request.app[BUS]
    return Stats(
        events_accepted=ingestor.accepted,
        events_duplicate=ingestor.duplicates,
        events_rejected=ingestor.rejected,
        events_scored=scoring.scored,
        scoring_backlog=scoring.backlog,
        agents_connected=request.app[PRESENCE].connected,
        dashboards=bus.subscriber_count,
        push_published=bus.stats.published,
        push_coalesced=bus.stats.coalesced,
        push_resyncs=bus.stats.resyncs,
        push_cutoffs=bus.stats.cutoffs,
    )


class JobPath(BaseModel):
    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")


@api.get("/api/v1/jobs/{job_id}", scope="hub:read", path_params=JobPath, response=JobView)
async def get_job(request: web.Request, *, path: JobPath) -> JobView:
    """Get a background job's state and progress."""
    job = request.app[JOBS].get(path.job_id)
    if job is None:
        raise NotFound(f"no job {path.job_id} (finished jobs are forgotten when the hub restarts)")
    return job.view()


@api.get("/api/v1/openapi.json", scope=None)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API, generated from its route tables."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


@api.get("/api/v1/docs", scope=None)
async def docs(request: web.Request) -> web.Response:
    """A readable API reference (Swagger UI, served locally)."""
    return aiohttp_jinja2.render_template("api_docs.html", request, {"version": __version__})
