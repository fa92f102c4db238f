"""SIEM forwarding: the sender of the SIEM queue, its batches, retries and start-up health check.

Rows of the store's SIEM queue (`hub.notices` says what they carry) are written with what they
tell: alerts with the alert, events of `siem_min_event_severity` and above with the scoring
pass that matched them. Ingest and scoring never wait on the SIEM: they only write rows.

Each node runs one `SiemForwarder`. It leases up to `siem_batch_max` rows of one kind (alerts
first, oldest first; `lease_until`, its node id) so nodes sharing a database never send the
same batch, waits at most `siem_batch_interval_s` for a batch to fill, and POSTs
`{"alerts": [...]}` to `{endpoint}/api/v1/alerts` or `{"events": [...]}` to
`{endpoint}/api/v1/events/batch` with `Authorization: Bearer <siem_api_key>`. A 2xx deletes the
rows. A 429 stops every request to the SIEM for its `Retry-After` (seconds or an HTTP date);
any other failure for a delay drawn as webhooks draw theirs (`hub.deliveries.retry_delay`, full
jitter up to `siem_retry_max_s`). Rows are retried forever: an outage must not drop alerts.
The queue is bounded by `siem_max_queue` rows instead: beyond it the oldest events (never
alerts) are dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time

import aiohttp

from hub import __version__
from hub.config import Settings
from hub.deliveries import retry_delay
from hub.store import Store

log = logging.getLogger(__name__)
USER_AGENT = f"AgentHub-SIEM/{__version__}"
PATHS = {"alert": "/api/v1/alerts", "event": "/api/v1/events/batch"}
HEALTH_PATH = "/api/v1/health"
_LEASE_MARGIN_S = 30.0  # beyond the longest request: a lease outlives every attempt it covers
_RETRY_AFTER_MAX_S = 3600.0  # a garbled Retry-After must not silence the SIEM for days


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date); None if unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)


class SiemForwarder:
    """Send this node's share of the SIEM queue until cancelled; off when no endpoint is set."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._endpoint = settings.siem_endpoint.rstrip("/") if settings.siem_endpoint else None
        self._key = settings.siem_api_key
        self._node = settings.node_id
        self._batch_max = settings.siem_batch_max
        self._fill_s = settings.siem_batch_interval_s
        self._timeout_s = settings.siem_timeout_s
        self._base_s = settings.siem_retry_base_s
        self._max_s = settings.siem_retry_max_s
        self._max_queue = settings.siem_max_queue
        self._lease_s = settings.siem_timeout_s + _LEASE_MARGIN_S
        self._poll_s = max(settings.siem_batch_interval_s, 0.05)  # other nodes' rows, expired leases
        self._failures = 0  # failed requests in a row
        self._paused_until = 0.0  # no request to the SIEM before this (a 429, a backoff)
        self.dropped = 0  # events dropped from a full queue since start

    async def run(self) -> None:
        """Check the SIEM once, then forward until cancelled; leases of this node end with it."""
        if self._endpoint is None:
            log.info("SIEM forwarding off (HUB_SIEM_ENDPOINT not set)")
            return
        # Nothing of this node is in flight while it starts: leases a crash left are its own.
        await self._store.release_siem_leases(self._node)
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers()) as session:
            await self._check_health(session)
            try:
                while True:
                    sent = False
                    try:
                        await self._trim()
                        sent = await self._forward_batch(session)
                    except Exception:  # the store failed: try again at the next poll
                        log.exception("forwarding to the SIEM failed; will retry")
                    if not sent:
                        await self._sleep()
            finally:
                with contextlib.suppress(Exception):
                    await self._store.release_siem_leases(self._node)

    def _headers(self) -> dict[str, str]:
        assert self._key is not None  # settings require a key with an endpoint
        return {"Authorization": f"Bearer {self._key.get_secret_value()}", "User-Agent": USER_AGENT}

    async def _check_health(self, session: aiohttp.ClientSession) -> None:
        error, _ = await self._request(session, "GET", HEALTH_PATH, None)
        if error is None:
            log.info("SIEM at %s reachable", self._endpoint)
        else:
            log.warning("SIEM at %s unreachable (%s): alerts queue until it answers", self._endpoint, error)

    async def _trim(self) -> None:
        # A read first: the writer is not asked for anything while the queue is within bounds.
        if await self._store.siem_queue_depth() <= self._max_queue:
            return
        dropped = await self._store.trim_siem_queue(self._max_queue)
        if dropped:
            self.dropped += dropped
            log.warning(
                "SIEM queue full (%d rows): dropped the %d oldest events (%d since start)",
                self._max_queue, dropped, self.dropped,
            )  # fmt: skip

    async def _forward_batch(self, session: aiohttp.ClientSession) -> bool:
        """Send one due batch, if there is one and the SIEM may be asked now; say whether one went."""
        now = time.time()
        if now < self._paused_until:
            return False
        claimed = await self._store.claim_siem(
            now=now, node=self._node, lease_s=self._lease_s, limit=self._batch_max,
            filled_before=now - self._fill_s,
        )  # fmt: skip
        if claimed is None:
            return False
        kind, rows = claimed
        seqs = [row["seq"] for row in rows]
        # The bodies were fixed at enqueue: they are joined, not encoded again.
        body = b'{"%ss":[' % kind.encode() + b",".join(bytes(row["body"]) for row in rows) + b"]}"
        error, wait_s = await self._request(session, "POST", PATHS[kind], body)
        if error is None:
            if self._failures:
                log.info("SIEM at %s answering again", self._endpoint)
            self._failures = 0
            await self._store.finish_siem(seqs)
            return True
        self._back_off(error, wait_s)
        await self._store.retry_siem(seqs, self._node, self._paused_until)
        return False

    async def _request(
        self, session: aiohttp.ClientSession, method: str, path: str, body: bytes | None
    ) -> tuple[str | None, float | None]:
        """Make one request to the SIEM; return why it failed (None: it answered 2xx), and a 429's wait."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            async with session.request(
                method, f"{self._endpoint}{path}", data=body, headers=headers, allow_redirects=False
            ) as answer:
                if 200 <= answer.status < 300:
                    return None, None
                if answer.status == 429:
                    return "the SIEM answered 429", retry_after_s(
                        answer.headers.get("Retry-After"), time.time()
                    )
                return f"the SIEM answered {answer.status}", None
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s", None
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}", None

    def _back_off(self, error: str, wait_s: float | None) -> None:
        # No request to the SIEM until then, from this node: a 429 for its Retry-After,
        # anything else for a delay that grows with each failure in a row.
        self._failures += 1
        delay = retry_delay(self._failures, self._base_s, self._max_s) if wait_s is None else wait_s
        self._paused_until = time.time() + delay
        log.warning(
            "forwarding to the SIEM at %s failed (%s); retrying in %.1f s", self._endpoint, error, delay
        )

    async def _sleep(self) -> None:
        now = time.time()
        delay = self._poll_s
        if self._paused_until > now:
            delay = min(delay, self._paused_until - now)
        else:
            with contextlib.suppress(Exception):
                due = await self._store.next_siem_at(now=now, fill_s=self._fill_s)
                if due is not None:
                    delay = min(delay, max(0.0, due - now))
        await asyncio.sleep(max(delay, 0.01))
