"""Processes and their risk scores, each with its explanation."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.spec import ApiRoutes, json_response
from hub.api.views import ProcessTree, ProcessView
from hub.jobs import JobView, recalculate_live
from hub.keys import BUS, INGESTOR, JOBS, SCORING, SETTINGS, STORE
from hub.models import AGENT_ID_PATTERN, ScoreView, score_view
from hub.problems import Conflict, NotFound

api = ApiRoutes("scores")


class ScoreQuery(PageQuery):
    agent_id: str | None = Field(None, pattern=AGENT_ID_PATTERN)
    risk_min: float = Field(0.0, ge=0, le=100)


class ProcessQuery(ScoreQuery):
    live: bool | None = Field(None, description="true: running processes only; false: exited only")


class ProcessPath(BaseModel):
    process_key: str = Field(max_length=200, description="`agent_id:pid:start_ts`, as in `process_key`")


@api.get("/api/v1/scores", scope="hub:read", query=ScoreQuery, response=PageOf[ScoreView])
async def list_scores(request: web.Request, *, query: ScoreQuery) -> dict[str, Any]:
    """Rank processes by risk, highest first."""
    return await paginate(
        request, query, request.app[STORE].list_scores, risk_min=query.risk_min, agent_id=query.agent_id
    )


@api.get("/api/v1/scores/{process_key}", scope="hub:read", path_params=ProcessPath, response=ScoreView)
async def get_score(request: web.Request, *, path: ProcessPath) -> ScoreView:
    """Get one process's score and the rules that explain it."""
    return score_view(await _process(request, path.process_key))


@api.post("/api/v1/scores:recalculate", scope="hub:admin", response=JobView, status=202)
async def start_recalculation(request: web.Request) -> web.Response:
    """Replay stored events through the rule files as they are now (after a rule change).

    Runs as a background job (`GET /api/v1/jobs/{job_id}`, also named in `Location`). Ingest
    pauses while it runs: agents are answered `overloaded` and resend, losing nothing.
    """
    app, jobs = request.app, request.app[JOBS]
    if (running := jobs.running("recalculate")) is not None:
        raise Conflict(f"a recalculation is already running: job {running.id}", job_id=running.id)
    job = jobs.start(
        "recalculate",
        lambda job: recalculate_live(
            job,
            settings=app[SETTINGS],
            store=app[STORE],
            ingestor=app[INGESTOR],
            scoring=app[SCORING],
            bus=app[BUS],
        ),
    )
    return json_response(job.view(), status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})


@api.get("/api/v1/processes", scope="hub:read", query=ProcessQuery, response=PageOf[ProcessView])
async def list_processes(request: web.Request, *, query: ProcessQuery) -> dict[str, Any]:
    """List the processes scoring tracks, by process key."""
    return await paginate(
        request, query, request.app[STORE].list_processes, render=_process_view,
        risk_min=query.risk_min, agent_id=query.agent_id, live=query.live,
    )  # fmt: skip


@api.get("/api/v1/processes/{process_key}", scope="hub:read", path_params=ProcessPath, response=ProcessView)
async def get_process(request: web.Request, *, path: ProcessPath) -> dict[str, Any]:
    """Get one process: what scoring knows of it, its score and explanation."""
    return _process_view(await _process(request, path.process_key))


_TREE_ANCESTORS, _TREE_DESCENDANTS, _TREE_NODES = 16, 3, 200


@api.get(
    "/api/v1/processes/{process_key}/tree", scope="hub:read", path_params=ProcessPath, response=ProcessTree
)
async def get_process_tree(request: web.Request, *, path: ProcessPath) -> dict[str, Any]:
    """Get a process with its ancestors and descendants on its agent, each naming its `parent_key`.

    Parents are found by ppid: up to 16 levels of ancestors (topmost first), then descendants up
    to 3 levels below, level by level; 200 processes at most. A parent is the newest process
    with that pid that started no later than its child (pids are reused).
    """
    nodes = await request.app[STORE].process_tree(
        path.process_key, ancestors=_TREE_ANCESTORS, descendants=_TREE_DESCENDANTS, limit=_TREE_NODES
    )
    if nodes is None:
        raise NotFound(f"no process {path.process_key!r}")
    views = [{**_process_view(node), "parent_key": node["parent_key"]} for node in nodes]
    return {"process_key": path.process_key, "nodes": views}


async def _process(request: web.Request, process_key: str) -> dict[str, Any]:
    record = await request.app[STORE].get_process(process_key)
    if record is None:
        raise NotFound(f"no process {process_key!r}")
    return record


def _process_view(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record.get(name) for name in ProcessView.__annotations__}
