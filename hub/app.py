"""The one wiring place: build the aiohttp app, attach Socket.IO, start and stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
import socketio
import swagger_ui_bundle
from aiohttp import web

from hub import __version__
from hub.anomaly import AnomalyDetector, Throttles
from hub.api import TABLES
from hub.api.audit import audit_middleware
from hub.api.auth import auth_middleware
from hub.api.idempotency import IN_FLIGHT, idempotency_middleware
from hub.api.live import routes as live_routes
from hub.api.pagination import Cursors
from hub.api.ratelimit import (
    ADDRESS_LIMITS,
    CALLER_LIMITS,
    address_rate_limit_middleware,
    rate_limit_middleware,
)
from hub.api.signatures import SIGNATURES, SignatureVerifier
from hub.api.spec import openapi_document
from hub.audit import AuditLog
from hub.certificates import CertificateService, Disconnector, RevocationWatch
from hub.codec import SocketJson
from hub.commands import CommandService
from hub.config import Settings
from hub.deliveries import Deliverer
from hub.identity import AgentTrust
from hub.ingest import Ingestor
from hub.jobs import Jobs
from hub.keys import (
    AGENT_TRUST,
    AUDIT,
    BUS,
    CERTIFICATES,
    CLOCK,
    COMMANDS,
    CURSORS,
    DELIVERER,
    INGESTOR,
    JOBS,
    METRICS,
    NODE_HOLD,
    OPENAPI,
    PRESENCE,
    REVOKED_TOKENS,
    SCORING,
    SESSIONS,
    SETTINGS,
    SIEM,
    STARTED_AT,
    STORE,
    USERS,
    VERIFIER,
    WEBHOOKS,
)
from hub.limits import TokenBuckets
from hub.nodes import ClockWatch, hold_node_id, keep_node_id
from hub.notices import watch_expiring_certificates
from hub.notify import Webhooks
from hub.observability import HubMetrics, observe_middleware
from hub.presence import Presence
from hub.problems import problem_middleware
from hub.pulse import beat
from hub.push import PushBus, push_bus
from hub.rules import load_rules
from hub.scoring import RiskEngine, RiskParams, ScoringService
from hub.sessions import SessionService
from hub.siem import SiemForwarder
from hub.store import create_store
from hub.tokens import RevokedTokens, TokenVerifier, load_secret
from hub.transport import NAMESPACE, AgentNamespace, AgentServer
from hub.users import Users
from web.signin import page_headers
from web.signin import routes as signin_routes
from web.views import routes as page_routes

log = logging.getLogger(__name__)
# aiohttp waits this long (twice at worst: then it cancels and waits again) for the HTTP
# requests and dashboards left after the agents' drain; systemd's TimeoutStopSec covers it.
SHUTDOWN_GRACE_S = 5.0
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
NAMESPACE_KEY = web.AppKey("namespace", AgentNamespace)


def create_app(settings: Settings) -> web.Application:
    """Build the hub: every component, its routes and its lifecycle."""
    rules = load_rules(settings.rule_files)  # a bad rule file stops start-up here
    # Observation outermost: it sees the answer problems were rendered into. Audit inside auth
    # (it names the actor) and rate limiting (refusals there stay cheap). The middlewares that
    # only check and pass on are plain functions that return the handler's coroutine: an agent's
    # socket lives inside this chain for days, and an awaiting frame of each would live with it.
    middlewares = [
        observe_middleware,
        problem_middleware,
        address_rate_limit_middleware,
        auth_middleware,
        rate_limit_middleware,
        audit_middleware,
        idempotency_middleware,
    ]
    # aiohttp's own body limit sits above every other (API bodies, Socket.IO polling frames);
    # the API and ingest enforce their tighter, configurable limits themselves.
    client_max_size = max(settings.api_max_body_bytes, settings.max_frame_bytes)
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    metrics = HubMetrics(node_id=settings.node_id)
    store = create_store(settings, on_commit=metrics.observe_commit)
    bus = push_bus(settings)
    engine = RiskEngine(rules, RiskParams.from_settings(settings))
    scoring = ScoringService(
        engine, store, bus.publish, max_backlog=settings.scoring_max_backlog,
        node_id=settings.node_id, takeover_s=settings.scoring_takeover_s,
        on_lag=metrics.scoring_lag.observe, on_alert=metrics.count_alert,
        siem_min_severity=settings.siem_min_event_severity if settings.siem_endpoint else None,
    )  # fmt: skip
    presence = Presence(settings, store, bus.publish)
    throttles = Throttles(store, burst=settings.max_batch_events)
    anomalies = AnomalyDetector(
        settings, store, throttles, bus.publish,
        connected=lambda agent_id: presence.sid_of(agent_id) is not None, on_alert=metrics.count_alert,
    )  # fmt: skip
    ingestor = Ingestor(settings, store, scoring, throttles=throttles, anomalies=anomalies)
    trust = AgentTrust.from_settings(settings, store)
    commands = CommandService(settings, store, bus.publish)
    namespace = AgentNamespace(
        settings, ingestor, presence, commands=commands, trust=trust, ack_latency=metrics.ack_latency
    )
    commands.attach(namespace)
    app[COMMANDS] = commands
    deliverer = Deliverer(settings, store, on_outcome=metrics.count_delivery)
    siem = SiemForwarder(settings, store)
    app[SIEM] = siem
    clock = app[CLOCK] = ClockWatch(store, settings.max_clock_skew_s)
    metrics.watch(
        ingestor=ingestor, presence=presence, bus=bus, scoring=scoring, store=store,
        siem=siem, clock=clock,
    )  # fmt: skip
    app[METRICS] = metrics
    app[DELIVERER] = deliverer
    app[WEBHOOKS] = Webhooks(settings, store, deliverer.wake)
    app[AGENT_TRUST] = trust
    revocations = RevocationWatch(store, namespace.revoke)
    disconnect = _follow_other_nodes(bus, namespace, trust, revocations, commands)
    app[CERTIFICATES] = CertificateService(settings, store, trust, disconnect, bus.publish)

    app[SETTINGS], app[STORE], app[BUS], app[SCORING] = settings, store, bus, scoring
    app[INGESTOR], app[PRESENCE], app[NAMESPACE_KEY] = ingestor, presence, namespace
    app[VERIFIER] = TokenVerifier(settings)
    app[REVOKED_TOKENS] = RevokedTokens(store, ttl_s=settings.token_revocation_cache_s)
    app[AUDIT] = AuditLog(store)
    app[USERS] = Users(settings, store)
    app[SESSIONS] = SessionService(settings, store)
    app[CURSORS] = Cursors(load_secret(settings))
    app[JOBS] = Jobs()
    app[SIGNATURES] = SignatureVerifier(store, max_skew_s=settings.hmac_max_skew_s)
    app[CALLER_LIMITS] = TokenBuckets(rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
    app[ADDRESS_LIMITS] = TokenBuckets(
        rate=settings.rate_limit_address_per_s, burst=settings.rate_limit_address_burst
    )
    app[IN_FLIGHT] = set()
    app[OPENAPI] = orjson.dumps(openapi_document(TABLES, title="Agent Hub API", version=__version__))
    app[STARTED_AT] = time.time()

    sio = AgentServer(
        async_mode="aiohttp",
        json=SocketJson,
        namespaces=[NAMESPACE],  # not the default "/": it admits anyone, certificate or not
        max_http_buffer_size=settings.max_frame_bytes,
        connect_timeout_s=settings.connect_timeout_s,
        max_connecting_per_address=settings.max_connecting_per_address,
        trusted_proxies=settings.trusted_proxies,
        logger=False,
        engineio_logger=False,
        client_manager=_client_manager(settings),
    )
    sio.register_namespace(namespace)
    sio.attach(app)

    for table in TABLES:
        table.add_to(app)
    app.add_routes(live_routes)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(WEB_DIR / "templates"), autoescape=True)
    app.add_routes(signin_routes)
    app.add_routes(page_routes)
    app.on_response_prepare.append(page_headers)
    app.router.add_static("/static/swagger-ui/", swagger_ui_bundle.swagger_ui_path)
    app.router.add_static("/static/", WEB_DIR / "static")
    app.cleanup_ctx.append(_metrics_listener)
    app.cleanup_ctx.append(_nodes)  # before _lifecycle: closed after everything that publishes stopped
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(
        _background("command-expiry", commands.expire_loop)
    )  # after _lifecycle: stopped before the store closes
    app.cleanup_ctx.append(_background("revocation-watch", revocations.run))  # likewise
    app.cleanup_ctx.append(_background("scoring-pending-watch", scoring.watch_pending))  # likewise
    app.cleanup_ctx.append(_webhook_deliveries)  # likewise
    app.cleanup_ctx.append(_siem_forwarding)  # likewise
    app.cleanup_ctx.append(_anomaly_detection(anomalies))  # likewise
    app.on_shutdown.append(_drain_agents)
    app.on_shutdown.append(_answer_command_waiters)
    app.on_shutdown.append(_send_dashboards_away)
    return app


async def _drain_agents(app: web.Application) -> None:
    # `serve` drains before aiohttp's cleanup; this catches a hub stopped by its runner alone
    # (tests, or agents admitted late). It runs before aiohttp waits for the connections left.
    await app[NAMESPACE_KEY].drain()


def _client_manager(settings: Settings) -> socketio.AsyncManager:
    """python-socketio's manager: in process for one node, over Redis for several."""
    if settings.redis_url is None:
        return socketio.AsyncManager()
    # Since python-socketio 5 the Redis manager serializes with the server's JSON module (orjson
    # here), never pickle; `json` says so for a write-only manager as well.
    return socketio.AsyncRedisManager(
        settings.redis_url.get_secret_value(),
        channel=f"{settings.redis_prefix}:socketio",
        json=SocketJson,
        redis_options={"socket_connect_timeout": 5},
    )


def _follow_other_nodes(
    bus: PushBus,
    namespace: AgentNamespace,
    trust: AgentTrust,
    revocations: RevocationWatch,
    commands: CommandService,
) -> Disconnector:
    """Apply here what other nodes did; return how a revocation closes sockets on every node.

    A revocation closes the sockets using the certificate here at once, and elsewhere when
    the others hear of it; an upload is trusted here at once, elsewhere likewise. What another
    node says is only a hint: each node reads the store for what it does. Should messages have
    been lost (Redis away), each node catches up the same way.
    """

    async def revoke(fingerprint: str, reason: str) -> int:
        change = {"fingerprint": fingerprint, "status": "revoked", "reason": reason}
        bus.publish("certificate", fingerprint, change)
        return await namespace.revoke(fingerprint, reason)

    async def follow(change: dict[str, Any]) -> None:
        if change.get("status") == "revoked":
            await revocations.check()
        elif change.get("status") == "uploaded":
            await trust.load_uploaded()

    async def catch_up() -> None:
        await revocations.check()
        await trust.load_uploaded()
        for agent_id in namespace.agent_ids():  # a command queued elsewhere meanwhile
            await commands.deliver_queued(agent_id)

    bus.follow("certificate", follow)
    # An agent here that has reconnected to another node.
    bus.follow("agent", namespace.follow_remote, concerns=namespace.holds_elsewhere)
    bus.follow("command", commands.follow_remote)  # a command sent through another node, for an agent here
    bus.on_missed(catch_up)
    return revoke


async def _nodes(app: web.Application) -> AsyncIterator[None]:
    # The push bus and python-socketio's manager: what reaches the other nodes, if any.
    await app[BUS].start()
    yield
    await app[BUS].close()
    listener = getattr(app[NAMESPACE_KEY].server.manager, "thread", None)  # a Redis manager's, once used
    if listener is not None:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def _send_dashboards_away(app: web.Application) -> None:
    # Before aiohttp waits for open connections: a dashboard would hold the stop for the whole grace.
    app[BUS].send_away()


async def _answer_command_waiters(app: web.Application) -> None:
    # Operators waiting for acks get the commands' state now rather than a cut connection.
    app[COMMANDS].release_waiters()


def _background(
    name: str, run: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx step that runs `run()` as a task while the app runs, cancelled at cleanup."""

    async def step(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name=name)
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return step


async def _webhook_deliveries(app: web.Application) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(app[DELIVERER].run(), name="webhook-deliveries"),
        asyncio.create_task(
            watch_expiring_certificates(app[SETTINGS], app[STORE]), name="certificate-expiry"
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _siem_forwarding(app: web.Application) -> AsyncIterator[None]:
    # The forwarder checks the SIEM in its own task: start-up never waits for it.
    task = asyncio.create_task(app[SIEM].run(), name="siem-forwarding")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _anomaly_detection(
    anomalies: AnomalyDetector,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        await app[INGESTOR].throttles.load()  # throttles outlive restarts
        task = asyncio.create_task(anomalies.run(), name="anomaly-detection")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return run


async def _metrics_listener(app: web.Application) -> AsyncIterator[None]:
    address = app[SETTINGS].metrics_address
    if address is not None:
        await app[METRICS].listen(*address)
    yield
    await app[METRICS].close()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    store, scoring, presence, settings = app[STORE], app[SCORING], app[PRESENCE], app[SETTINGS]
    await store.open()
    try:  # before anything this node does by its id
        node = await hold_node_id(store, settings.node_id, settings.node_lease_s)
    except BaseException:
        await store.close()
        raise
    await app[AGENT_TRUST].load_uploaded()  # before the listener takes its first handshake
    await app[CERTIFICATES].write_crl()  # for a proxy in front (README "Behind nginx")
    # No agent is connected to a hub that is just starting, whatever the last run left.
    await store.mark_node_offline(settings.node_id, "transport_lost", time.time())
    keeper = app[NODE_HOLD] = asyncio.create_task(keep_node_id(store, node), name="node-id")
    clock = asyncio.create_task(app[CLOCK].watch(settings.node_lease_s), name="clock")
    scorer = asyncio.create_task(scoring.run(), name="scoring")
    watcher = asyncio.create_task(presence.watch(app[NAMESPACE_KEY].close), name="presence")
    pulse = asyncio.create_task(
        beat(
            app[INGESTOR],
            scoring,
            presence,
            store,
            app[BUS],
            node_id=settings.node_id,
            interval_s=settings.push_stats_interval_s,
        ),
        name="pulse",
    )
    yield
    # Stop in order: no new work, score and persist what was stored, give up the node id, then
    # close the store.
    watcher.cancel()
    pulse.cancel()
    clock.cancel()
    await app[JOBS].close()
    await app[INGESTOR].close()  # batches under way commit and reach scoring first
    scoring.stop()
    await asyncio.gather(watcher, pulse, clock, scorer, return_exceptions=True)
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)
    try:
        await store.release_node(settings.node_id, node["instance"])
    except Exception as exc:  # the next start of this id waits out the lease instead
        log.warning("giving up node id %r failed (%s)", settings.node_id, exc)
    await store.close()


def listener_ssl(app: web.Application) -> ssl.SSLContext | None:
    """Return the app's TLS context for its listener (uploads extend it), or None for plain HTTP."""
    context = app[AGENT_TRUST].context
    settings = app[SETTINGS]
    if context is None and settings.dev_insecure:
        log.warning("DEV MODE: serving plain HTTP; agents are NOT authenticated by certificate")
    elif context is None:
        log.warning(
            "serving plain HTTP behind trusted proxies %s: agents are identified only by their "
            "X-SSL-Client-Cert header; nothing but those proxies must reach this port",
            [str(proxy) for proxy in settings.trusted_proxies],
        )
    return context


async def serve(
    settings: Settings, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the hub until `stop` is set (SIGTERM/SIGINT in the CLI), then stop gracefully.

    It also stops, then raises Conflict, when another hub has taken its node id.

    The stop, in order: the listeners close (a connect is refused from then on); the agents
    are drained (`AgentNamespace.drain`, at most `drain_timeout_s`); then aiohttp's cleanup:
    on_shutdown answers command waiters, the HTTP requests and dashboards left get
    SHUTDOWN_GRACE_S to end before they are cancelled, and cleanup_ctx stops the background
    tasks, scores what was stored and closes the store.
    """
    app = create_app(settings)
    context = listener_ssl(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context, backlog=4096)
    await site.start()
    if settings.unix_socket is not None:  # for a proxy on this machine; "unix" in trusted_proxies trusts it
        await web.UnixSite(runner, str(settings.unix_socket), backlog=4096).start()
        log.info("agent hub also listening on unix socket %s", settings.unix_socket)
    _tune_garbage_collector()
    _tune_allocator()
    scheme = "https" if context else "http"
    log.info("agent hub %s listening on %s://%s:%d", __version__, scheme, settings.host, settings.port)
    if ready is not None:
        ready.set()
    lost: BaseException | None = None
    try:
        lost = await _until_stopped(stop or asyncio.Event(), app[NODE_HOLD])
        log.info("agent hub stopping: draining agents for at most %.1fs", settings.drain_timeout_s)
        # Drained before aiohttp's cleanup, whose first step drops whatever arrives on open
        # connections (RequestHandler.close): batches sent meanwhile would vanish unanswered.
        for listener in runner.sites:
            await listener.stop()
        await app[NAMESPACE_KEY].drain()
    finally:
        await runner.cleanup()
    if lost is not None:
        raise lost


async def _until_stopped(stop: asyncio.Event, hold: asyncio.Task[None]) -> BaseException | None:
    """Wait for `stop`, or for `hold` to end; return why it ended (this node's id is another hub's)."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([stopping, hold], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    lost = hold.exception() if hold.done() and not hold.cancelled() else None
    if lost is not None:
        log.error("%s; stopping", lost)
    return lost


def _tune_allocator() -> None:
    # uvloop gives each TLS connection a 256 KiB buffer it mostly never touches. Once glibc's
    # sliding mmap threshold has grown past that, such blocks come from its heap, where freed
    # ones fragment and stay resident; mapped on their own, untouched pages cost no RSS and
    # freed ones go back to the system. Elsewhere than glibc this is left alone.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _tune_garbage_collector() -> None:
    # Ingest allocates millions of short-lived dicts that reference counting frees; the cyclic
    # collector's young-generation passes over them, and its full passes over every long-lived
    # object (rules, app state), cost a large share of the hot path. Start-up objects are moved
    # out of its sight, and young passes run a hundred times less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 100)
