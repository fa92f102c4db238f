"""Alerts: list, get, acknowledge and resolve."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.spec import ApiRoutes
from hub.api.views import AlertStatus, AlertView
from hub.keys import BUS, PRINCIPAL, STORE
from hub.models import AGENT_ID_PATTERN, Severity
from hub.problems import Conflict, NotFound

api = ApiRoutes("alerts")


class AlertQuery(PageQuery):
    agent_id: str | None = Field(None, pattern=AGENT_ID_PATTERN)
    severity: Severity | None = None
    status: AlertStatus | None = None
    fingerprint: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="only this alert's repeats: rule, agent and process lineage",
    )


class AlertPath(BaseModel):
    alert_id: int = Field(ge=1, le=2**63 - 1)


class AlertChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000, description="why, for the next person who looks")


@api.get("/api/v1/alerts", scope="hub:read", query=AlertQuery, response=PageOf[AlertView])
async def list_alerts(request: web.Request, *, query: AlertQuery) -> dict[str, Any]:
    """List alerts, newest first.

    A repeat of an unresolved alert (same `fingerprint`) seen within HUB_ALERT_SUPPRESSION_WINDOW_S
    of it is not listed apart: it counts in that alert's `count` and moves its `last_seen_at`.
    """
    return await paginate(
        request, query, request.app[STORE].list_alerts,
        agent_id=query.agent_id, severity=query.severity, status=query.status, fingerprint=query.fingerprint,
    )  # fmt: skip


@api.get("/api/v1/alerts/{alert_id}", scope="hub:read", path_params=AlertPath, response=AlertView)
async def get_alert(request: web.Request, *, path: AlertPath) -> dict[str, Any]:
    """Get one alert with the explanation it was raised with."""
    alert = await request.app[STORE].get_alert(path.alert_id)
    if alert is None:
        raise NotFound(f"no alert {path.alert_id}")
    return alert


@api.post(
    "/api/v1/alerts/{alert_id}:acknowledge",
    scope="hub:write",
    path_params=AlertPath,
    body=AlertChange,
    response=AlertView,
)
async def acknowledge_alert(request: web.Request, *, path: AlertPath, body: AlertChange) -> dict[str, Any]:
    """Acknowledge an open alert: someone is looking at it."""
    return await _change(request, path.alert_id, "acknowledged", body.note, allowed_from=("open",))


@api.post(
    "/api/v1/alerts/{alert_id}:resolve",
    scope="hub:write",
    path_params=AlertPath,
    body=AlertChange,
    response=AlertView,
)
async def resolve_alert(request: web.Request, *, path: AlertPath, body: AlertChange) -> dict[str, Any]:
    """Resolve an alert, open or acknowledged."""
    return await _change(request, path.alert_id, "resolved", body.note, allowed_from=("open", "acknowledged"))


async def _change(
    request: web.Request,
    alert_id: int,
    status: AlertStatus,
    note: str | None,
    *,
    allowed_from: tuple[str, ...],
) -> dict[str, Any]:
    verb = "acknowledged" if status == "acknowledged" else "resolved"
    change: dict[str, Any] = {f"{verb}_by": request[PRINCIPAL].subject, f"{verb}_at": time.time()}
    if note is not None:  # the latest note given; a change without one keeps the earlier note
        change["note"] = note
    # Repeating a change is harmless: the store leaves the alert as it is, and it is answered.
    alert = await request.app[STORE].set_alert_status(alert_id, status, change, allowed_from=allowed_from)
    if alert is None:
        raise NotFound(f"no alert {alert_id}")
    if alert["status"] != status:
        raise Conflict(f"alert {alert_id} is {alert['status']}; it cannot become {status}")
    request.app[BUS].publish("alert", alert["id"], alert)
    return alert
