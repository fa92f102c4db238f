"""Prometheus metrics and structured logs with correlation ids.

Metrics are named `hub_<noun>_<unit>` and live in a registry of each app's own, so hubs
sharing a process never share counters. What the hub counts already (events, agents, push,
scoring backlog) is read at scrape time; histograms and counters exist only where nothing
counted before: group commits, socket acks, scoring lag, alerts, webhook deliveries, HTTP.

Logs are one JSON object a line (or plain text), each carrying what it was written under:
the HTTP request's id (`X-Request-ID`, also the problem's `correlation_id`), and the agent
id and socket id of a Socket.IO event. Token-like strings are masked on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from hub import __version__
from hub.keys import METRICS
from hub.problems import request_id

if TYPE_CHECKING:
    from hub.ingest import Ingestor
    from hub.nodes import ClockWatch
    from hub.presence import Presence
    from hub.push import PushBus
    from hub.scoring import ScoringService
    from hub.siem import SiemForwarder
    from hub.store import Store

log = logging.getLogger(__name__)
_http_log = logging.getLogger("hub.http")
SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
DELIVERY_OUTCOMES = ("delivered", "retrying", "dead")
_OUTBOX_STATES = ("pending", "dead")
# Label values a client chooses are bounded: unknown methods are one value, paths are route templates.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNMATCHED = "unmatched"
_CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COMMIT_SIZES = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, 5000, 10000)


class HubMetrics:
    """One hub's metrics: its registry, the distributions it observes and the counts it reads."""

    def __init__(self, *, node_id: str) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.commit_size = Histogram(
            "hub_store_commit_size_events",
            "Writes in one group commit (an event is one write; so is any other statement)",
            buckets=_COMMIT_SIZES, registry=registry,
        )  # fmt: skip
        self.commit_latency = Histogram(
            "hub_store_commit_latency_seconds", "Time one group commit took, fsync included",
            buckets=_SECONDS, registry=registry,
        )  # fmt: skip
        self.ack_latency = Histogram(
            "hub_ack_latency_seconds", "Time from an agent's events batch to its ack (Socket.IO)",
            buckets=_SECONDS, registry=registry,
        )  # fmt: skip
        self.scoring_lag = Histogram(
            "hub_scoring_lag_seconds", "Time from a committed batch's hand-over to its scoring",
            buckets=_SECONDS, registry=registry,
        )  # fmt: skip
        self.alerts = Counter("hub_alerts", "Alerts raised, by severity", ["severity"], registry=registry)
        self.deliveries = Counter(
            "hub_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"], registry=registry
        )
        self.http_requests = Counter(
            "hub_http_requests", "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"], registry=registry,
        )  # fmt: skip
        self.http_latency = Histogram(
            "hub_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route (not WebSocket sessions: they last hours)",
            ["method", "route"], buckets=_SECONDS, registry=registry,
        )  # fmt: skip
        for severity in SEVERITIES:  # present from the start: a rate over a missing series is no rate
            self.alerts.labels(severity)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)
        self.node_id = node_id
        self.outbox = dict.fromkeys(_OUTBOX_STATES, 0)
        self.siem_queue = 0
        self.listener: web.AppRunner | None = None
        self._store: Store | None = None

    def watch(
        self,
        *,
        ingestor: Ingestor,
        presence: Presence,
        bus: PushBus,
        scoring: ScoringService,
        store: Store,
        siem: SiemForwarder,
        clock: ClockWatch,
    ) -> None:
        """Read these components' own counters at every scrape."""
        self._store = store
        self.registry.register(_HubCollector(self, ingestor, presence, bus, scoring, siem, clock))

    def observe_commit(self, size: int, seconds: float) -> None:
        """Record one group commit of `size` writes."""
        self.commit_size.observe(size)
        self.commit_latency.observe(seconds)

    def count_alert(self, severity: str) -> None:
        """Count one raised alert."""
        self.alerts.labels(severity if severity in SEVERITIES else "UNKNOWN").inc()

    def count_delivery(self, outcome: str) -> None:
        """Count one webhook delivery attempt by its outcome (`DELIVERY_OUTCOMES`)."""
        self.deliveries.labels(outcome).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered HTTP request."""
        self.http_requests.labels(method, route, str(status)).inc()
        if status != HTTPStatus.SWITCHING_PROTOCOLS:  # a WebSocket's time is its whole session
            self.http_latency.labels(method, route).observe(seconds)

    async def response(self, request: web.Request) -> web.Response:
        """Render every metric in the format the scraper asks for (Prometheus text by default)."""
        await self._refresh_queues()
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(self.registry))
        response.headers["Content-Type"] = content_type  # aiohttp refuses `;` in content_type
        return response

    async def _refresh_queues(self) -> None:
        # The queues live in the store (every node's); a scrape is rare enough to ask it each time.
        if self._store is None:
            return
        try:
            counts = await self._store.count_deliveries()
            self.siem_queue = await self._store.siem_queue_depth()
        except Exception as exc:  # the last values stand; the scrape still answers
            log.warning("could not count the webhook and SIEM queues: %s", exc)
            return
        for state in _OUTBOX_STATES:
            self.outbox[state] = counts[state]

    async def listen(self, host: str, port: int) -> None:
        """Serve `/metrics` alone over plain HTTP on `host:port` (HUB_METRICS_LISTEN)."""
        app = web.Application()
        app.router.add_get("/metrics", self.response)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self.listener = runner
        log.info("metrics listening on http://%s:%d/metrics", host, runner.addresses[0][1])

    async def close(self) -> None:
        """Stop the metrics listener, if one runs."""
        if self.listener is not None:
            await self.listener.cleanup()
            self.listener = None


class _HubCollector(Collector):
    """The counts components keep anyway, read when scraped rather than kept twice."""

    def __init__(
        self,
        metrics: HubMetrics,
        ingestor: Ingestor,
        presence: Presence,
        bus: PushBus,
        scoring: ScoringService,
        siem: SiemForwarder,
        clock: ClockWatch,
    ) -> None:
        self._metrics = metrics
        self._siem = siem
        self._clock = clock
        self._ingestor = ingestor
        self._presence = presence
        self._bus = bus
        self._scoring = scoring

    def collect(self) -> Iterable[Metric]:
        ingestor, bus, stats = self._ingestor, self._bus, self._bus.stats
        info = GaugeMetricFamily("hub_info", "This hub node", labels=["version", "node"])
        info.add_metric([__version__, self._metrics.node_id], 1)
        yield info
        events = CounterMetricFamily(
            "hub_events", "Events in agents' batches, by outcome (duplicates were stored already)",
            labels=["outcome"],
        )  # fmt: skip
        for outcome, count in (
            ("accepted", ingestor.accepted),
            ("duplicate", ingestor.duplicates),
            ("rejected", ingestor.rejected),
        ):
            events.add_metric([outcome], count)
        yield events
        yield GaugeMetricFamily(
            "hub_agents_connected", "Agents with a live socket on this node", value=self._presence.connected
        )
        yield GaugeMetricFamily(
            "hub_ingest_pending_events", "Events taken in and not yet acked", value=ingestor.in_flight
        )
        yield CounterMetricFamily("hub_scored_events", "Events scored", value=self._scoring.scored)
        yield GaugeMetricFamily(
            "hub_scoring_backlog_events",
            "Events stored and waiting for scoring that may change a score",
            value=self._scoring.backlog,
        )
        yield GaugeMetricFamily("hub_push_subscribers", "Dashboards subscribed", value=bus.subscriber_count)
        yield CounterMetricFamily("hub_push_published_updates", "Updates published", value=stats.published)
        yield CounterMetricFamily(
            "hub_push_coalesced_updates",
            "Updates replaced by a newer one before a dashboard took them",
            value=stats.coalesced,
        )
        yield CounterMetricFamily(
            "hub_push_resyncs", "Times a slow dashboard's pending updates were dropped for a snapshot",
            value=stats.resyncs,
        )  # fmt: skip
        yield CounterMetricFamily(
            "hub_push_cutoffs", "Dashboards closed because they stopped reading", value=stats.cutoffs
        )
        outbox = GaugeMetricFamily(
            "hub_webhook_outbox_deliveries", "Webhook deliveries waiting (pending) or given up (dead)",
            labels=["state"],
        )  # fmt: skip
        for state, count in self._metrics.outbox.items():
            outbox.add_metric([state], count)
        yield outbox
        yield GaugeMetricFamily(
            "hub_siem_queue_rows", "Alerts and events waiting for the SIEM", value=self._metrics.siem_queue
        )
        yield CounterMetricFamily(
            "hub_siem_dropped_events", "Events dropped from a full SIEM queue (alerts never are)",
            value=self._siem.dropped,
        )  # fmt: skip
        if self._clock.skew_s is not None:  # measured only against a store with a clock of its own
            yield GaugeMetricFamily(
                "hub_clock_skew_seconds", "This node's clock minus the shared store's, at the last check",
                value=self._clock.skew_s,
            )  # fmt: skip


# HTTP --------------------------------------------------------------------------------------


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route template, and log it under its request id."""
    route = _route(request)
    method = request.method if request.method in _METHODS else "OTHER"
    started = time.perf_counter()
    status = 500  # unless an answer says otherwise
    with log_context(request_id=request_id(request)):
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # redirects: the problem middleware passes them on
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = _CLIENT_CLOSED
            raise
        finally:
            seconds = time.perf_counter() - started
            request.app[METRICS].observe_request(method, route, status, seconds)
            _log_request(request, method, route, status, seconds)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return _UNMATCHED if resource is None else resource.canonical


def _log_request(request: web.Request, method: str, route: str, status: int, seconds: float) -> None:
    # Problems are worth a line each; successes only when debugging. The path is logged as sent
    # (percent-encoded, no query string: that is where `access_token` travels).
    level = logging.INFO if status >= 400 else logging.DEBUG
    if not _http_log.isEnabledFor(level):
        return
    path = request.rel_url.raw_path[:512]
    fields = {"method": method, "path": path, "route": route, "status": status,
              "duration_ms": round(seconds * 1000, 2)}  # fmt: skip
    _http_log.log(level, "%s %s -> %d (%.1f ms)", method, path, status, seconds * 1000, extra=fields)


# Logs --------------------------------------------------------------------------------------

_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("log_context", default={})  # noqa: B039 - never mutated
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SECRETS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
    (re.compile(r"(?i)\b(bearer\s+)[^\s,;\"']+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(access_token|password|secret|csrf_token|token)=[^&\s,;\"']+"), r"\1=[redacted]"),
)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add `fields` (request_id, agent_id, sid) to every log line written inside this block."""
    known = {name: value for name, value in fields.items() if value is not None}
    token = _CONTEXT.set({**_CONTEXT.get(), **known})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def redact(text: str) -> str:
    """Mask what looks like a token, password or secret in `text`."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, the context, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            **_CONTEXT.get(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and name not in entry:
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """A readable line, with the context appended in brackets."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        context = _CONTEXT.get()
        if context:
            line += " [" + " ".join(f"{name}={value}" for name, value in context.items()) + "]"
        return line


def configure_logging(log_format: str, level: int | str) -> None:
    """Send every log line to stderr as JSON (`json`) or text (`text`), from `level` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
