"""Every piece of shared application state, declared once as a typed `web.AppKey`."""

from __future__ import annotations

from aiohttp import web

from hub.config import Settings
from hub.ingest import Ingestor
from hub.presence import Presence
from hub.push import PushBus
from hub.scoring import ScoringService
from hub.store import Store
from hub.tokens import Principal, TokenVerifier

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BUS = web.AppKey("bus", PushBus)
SCORING = web.AppKey("scoring", ScoringService)
INGESTOR = web.AppKey("ingestor", Ingestor)
PRESENCE = web.AppKey("presence", Presence)
VERIFIER = web.AppKey("verifier", TokenVerifier)
STARTED_AT = web.AppKey("started_at", float)

PRINCIPAL = web.RequestKey("principal", Principal)
