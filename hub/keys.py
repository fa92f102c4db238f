"""Every piece of shared application state, declared once as a typed `web.AppKey`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from hub.audit import AuditLog
from hub.certificates import CertificateService
from hub.commands import CommandService
from hub.config import Settings
from hub.deliveries import Deliverer
from hub.identity import AgentTrust
from hub.ingest import Ingestor
from hub.jobs import Jobs
from hub.nodes import ClockWatch
from hub.notify import Webhooks
from hub.presence import Presence
from hub.push import PushBus
from hub.scoring import ScoringService
from hub.sessions import Session, SessionService
from hub.siem import SiemForwarder
from hub.store import Store
from hub.tokens import Principal, RevokedTokens, TokenVerifier
from hub.users import Users

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BUS = web.AppKey("bus", PushBus)
SCORING = web.AppKey("scoring", ScoringService)
INGESTOR = web.AppKey("ingestor", Ingestor)
PRESENCE = web.AppKey("presence", Presence)
VERIFIER = web.AppKey("verifier", TokenVerifier)
REVOKED_TOKENS = web.AppKey("revoked_tokens", RevokedTokens)
AUDIT = web.AppKey("audit", AuditLog)
COMMANDS = web.AppKey("commands", CommandService)
AGENT_TRUST = web.AppKey("agent_trust", AgentTrust)  # owns the listener's TLS context
CERTIFICATES = web.AppKey("certificates", CertificateService)
SESSIONS = web.AppKey("sessions", SessionService)
USERS = web.AppKey("users", Users)
WEBHOOKS = web.AppKey("webhooks", Webhooks)
DELIVERER = web.AppKey("deliverer", Deliverer)  # sends the webhook outbox
SIEM = web.AppKey("siem", SiemForwarder)  # forwards alerts and severe events to the SIEM
STARTED_AT = web.AppKey("started_at", float)
# Declared by annotation: the API modules that define these types import this module.
CURSORS: web.AppKey[Cursors] = web.AppKey("cursors")
JOBS = web.AppKey("jobs", Jobs)
OPENAPI = web.AppKey("openapi", bytes)  # the rendered document, built once at start
# Renews this node's hold on its id while the hub runs; ends with Conflict if another hub took it.
NODE_HOLD: web.AppKey[asyncio.Task[None]] = web.AppKey("node_hold")
CLOCK = web.AppKey("clock", ClockWatch)  # this node's clock against the shared store's
METRICS: web.AppKey[HubMetrics] = web.AppKey("metrics")  # hub.observability imports this module

if TYPE_CHECKING:
    from hub.api.pagination import Cursors
    from hub.observability import HubMetrics

PRINCIPAL = web.RequestKey("principal", Principal)
SESSION = web.RequestKey("session", Session)  # set when a signed-in operator's cookie authenticated
