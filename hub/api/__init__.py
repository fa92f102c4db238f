"""The operator API: every route table, in the order the OpenAPI document lists them."""

from __future__ import annotations

from hub.api import agents, alerts, audit, certificates, commands, events, metrics, scores, system, webhooks
from hub.api.spec import ApiRoutes

TABLES: list[ApiRoutes] = [
    system.api,
    metrics.api,
    agents.api,
    events.api,
    scores.api,
    alerts.api,
    commands.api,
    audit.api,
    certificates.api,
    webhooks.api,
]
