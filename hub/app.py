"""The one wiring place: build the aiohttp app, attach Socket.IO, start and stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
import socketio
from aiohttp import web

from hub import __version__
from hub.api.auth import auth_middleware
from hub.api.routes import routes as api_routes
from hub.codec import SocketJson
from hub.config import Settings
from hub.identity import server_ssl_context
from hub.ingest import Ingestor
from hub.keys import BUS, INGESTOR, PRESENCE, SCORING, SETTINGS, STARTED_AT, STORE, VERIFIER
from hub.presence import Presence
from hub.problems import problem_middleware
from hub.push import PushBus
from hub.rules import load_rules
from hub.scoring import RiskEngine, RiskParams, ScoringService
from hub.store.sqlite import SqliteStore
from hub.tokens import TokenVerifier
from hub.transport import AgentNamespace

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
NAMESPACE_KEY = web.AppKey("namespace", AgentNamespace)


def create_app(settings: Settings) -> web.Application:
    """Build the hub: every component, its routes and its lifecycle."""
    rules = load_rules(settings.rule_files)  # a bad rule file stops start-up here
    app = web.Application(middlewares=[problem_middleware, auth_middleware])
    store = SqliteStore(
        settings.db_path,
        commit_max_events=settings.commit_max_events,
        retry_after_ms=settings.retry_after_ms,
    )
    bus = PushBus(max_pending=settings.push_max_pending)
    engine = RiskEngine(rules, RiskParams.from_settings(settings))
    scoring = ScoringService(engine, store, bus.publish, max_backlog=settings.scoring_max_backlog)
    ingestor = Ingestor(settings, store, scoring)
    presence = Presence(settings, store, bus.publish)
    namespace = AgentNamespace(settings, store, ingestor, presence)

    app[SETTINGS], app[STORE], app[BUS], app[SCORING] = settings, store, bus, scoring
    app[INGESTOR], app[PRESENCE], app[NAMESPACE_KEY] = ingestor, presence, namespace
    app[VERIFIER] = TokenVerifier(settings)
    app[STARTED_AT] = time.time()

    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        json=SocketJson,
        max_http_buffer_size=settings.max_frame_bytes,
        logger=False,
        engineio_logger=False,
    )
    sio.register_namespace(namespace)
    sio.attach(app)

    app.add_routes(api_routes)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(WEB_DIR / "templates"), autoescape=True)
    app.router.add_get("/", _live_page)
    app.router.add_static("/static/", WEB_DIR / "static")
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_disconnect_agents)
    return app


async def _disconnect_agents(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for open connections: agents learn at once that
    # the hub is going, instead of timing out; whatever they had in flight they resend.
    await app[NAMESPACE_KEY].close_all("server_shutdown")


async def _live_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("live.html", request, {"version": __version__})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    store, scoring, presence = app[STORE], app[SCORING], app[PRESENCE]
    await store.open()
    # No agent is connected to a hub that is just starting, whatever the last run left.
    await store.mark_all_offline("transport_lost", time.time())
    scorer = asyncio.create_task(scoring.run(), name="scoring")
    watcher = asyncio.create_task(presence.watch(app[NAMESPACE_KEY].close), name="presence")
    yield
    # Stop in order: no new work, score and persist what was stored, then close the store.
    watcher.cancel()
    await app[INGESTOR].close()  # batches under way commit and reach scoring first
    scoring.stop()
    await asyncio.gather(watcher, scorer, return_exceptions=True)
    await store.close()


def listener_ssl(settings: Settings) -> ssl.SSLContext | None:
    """Return the TLS context of the listener, or None in development plain-HTTP mode."""
    if settings.dev_insecure:
        log.warning("DEV MODE: serving plain HTTP; agents are NOT authenticated by certificate")
        return None
    return server_ssl_context(settings.certs_dir)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run the hub until cancelled (SIGINT/SIGTERM cancel it from the CLI)."""
    context = listener_ssl(settings)
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context, backlog=4096)
    await site.start()
    scheme = "https" if context else "http"
    log.info("agent hub %s listening on %s://%s:%d", __version__, scheme, settings.host, settings.port)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
