"""Webhook deliveries: the outbox sender, its retries and the signature receivers check.

Deliveries are rows of the store's outbox (`hub.notices` says what they carry). Each node
runs one `Deliverer`: it leases due deliveries (`lease_until`, its node id) so nodes sharing a
database never send the same attempt twice, at most one per subscription at a time (one lane
each: a slow receiver holds up only itself) and `webhook_max_concurrency` in all. Ingest and
scoring never wait on it: they only write rows.

An attempt checks the URL again with the destination guard (`hub.notify`), connects only
through `GuardedResolver` and follows no redirect (a 3xx is a failed attempt naming where it
pointed). Any 2xx delivers; anything else fails the attempt, retried after a delay drawn
uniformly below min(`webhook_retry_max_s`, `webhook_retry_base_s` * 2^(attempts-1)) (full
jitter), until `webhook_max_attempts`: then the delivery is dead, kept for an operator to
redeliver. Every retry sends the same bytes with the same delivery id, so a receiver drops
duplicates by `X-AgentHub-Delivery` (a hub stopped mid-attempt may send one again).

Signature (Stripe's scheme): `X-AgentHub-Signature: t=<unix seconds>,v1=<hex>` where the hex is
HMAC-SHA256(secret, f"{t}.{body}"); a second `v1=` is the rotated-out secret's while it signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from hub import __version__
from hub.config import Settings
from hub.notify import DestinationPolicy, DestinationRefused, GuardedResolver
from hub.store import Store

log = logging.getLogger(__name__)
USER_AGENT = f"AgentHub-Webhooks/{__version__}"
_LEASE_MARGIN_S = 30.0  # beyond the longest attempt: a lease outlives every attempt it covers
_PRUNE_EVERY_S = 3600.0


def signature(secrets: list[str], body: bytes, timestamp: int) -> str:
    """The X-AgentHub-Signature value of `body` sent at `timestamp`, one `v1` per secret."""
    signed = f"{timestamp}.".encode() + body
    digests = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets]
    return ",".join([f"t={timestamp}", *(f"v1={digest}" for digest in digests)])


def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: exponential, full jitter."""
    return random.uniform(0.0, min(max_s, base_s * 2.0 ** (attempts - 1)))


class Deliverer:
    """Send this node's share of due webhook deliveries until cancelled."""

    def __init__(
        self, settings: Settings, store: Store, *, on_outcome: Callable[[str], None] | None = None
    ) -> None:
        self._store = store
        self._on_outcome = on_outcome  # told each attempt's outcome: delivered, retrying or dead
        self._policy = DestinationPolicy.from_settings(settings)
        self._node = settings.node_id
        self._max_attempts = settings.webhook_max_attempts
        self._base_s = settings.webhook_retry_base_s
        self._max_s = settings.webhook_retry_max_s
        self._timeout_s = settings.webhook_timeout_s
        self._capacity = settings.webhook_max_concurrency
        self._poll_s = settings.webhook_poll_interval_s
        self._retention_s = settings.webhook_delivery_retention_s
        self._pruned_at = float("-inf")
        self._lease_s = settings.webhook_resolve_timeout_s + settings.webhook_timeout_s + _LEASE_MARGIN_S
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Look for due deliveries now (one was just queued here) rather than at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        """Claim and send due deliveries until cancelled; leases of this node end with it."""
        # Nothing of this node is in flight while it starts: leases a crash left are its own.
        await self._store.release_leases(self._node)
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._policy), limit=self._capacity)
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                while True:
                    try:
                        await self._claim(session)
                        await self._prune()
                    except Exception:  # the store failed: try again at the next poll
                        log.exception("claiming webhook deliveries failed; will retry")
                    await self._sleep()
            finally:
                for task in self._in_flight:
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await self._store.release_leases(self._node)

    async def _claim(self, session: aiohttp.ClientSession) -> None:
        room = self._capacity - len(self._in_flight)
        if room <= 0:
            return
        claimed = await self._store.claim_deliveries(
            now=time.time(), node=self._node, lease_s=self._lease_s, limit=room
        )
        for delivery in claimed:
            task = asyncio.create_task(self._deliver(session, delivery), name=f"webhook {delivery['id']}")
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    async def _prune(self) -> None:
        # Finished deliveries are kept a while for operators, then go: the outbox stays small.
        if time.monotonic() - self._pruned_at < _PRUNE_EVERY_S:
            return
        self._pruned_at = time.monotonic()
        count = await self._store.prune_deliveries(before=time.time() - self._retention_s)
        if count:
            log.info("deleted %d webhook deliveries older than %g s", count, self._retention_s)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wakeup.set()  # a lane and a slot are free again

    async def _sleep(self) -> None:
        delay = self._poll_s
        if len(self._in_flight) < self._capacity:
            with contextlib.suppress(Exception):
                due = await self._store.next_delivery_at(now=time.time())
                if due is not None:
                    delay = min(delay, max(0.0, due - time.time()))
        # asyncio.timeout, not wait_for: on 3.11 wait_for returns instead of raising when it is
        # cancelled just as the event fires, and this loop would then outlive its cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _deliver(self, session: aiohttp.ClientSession, delivery: dict[str, Any]) -> None:
        started = time.time()
        status, error = await self._attempt(session, delivery, started)
        now = time.time()
        attempts = delivery["attempts"] + 1
        changes: dict[str, Any] = {"attempts": attempts, "last_attempt_at": started, "last_status": status,
                                   "last_error": error}  # fmt: skip
        if error is None:
            changes |= {"state": "delivered", "delivered_at": now, "next_attempt_at": None}
        elif attempts >= self._max_attempts:
            changes |= {"state": "dead", "next_attempt_at": None}
            # Not the error itself: it may quote the URL or a redirect, and webhook URLs hold secrets.
            log.warning(
                "webhook delivery %s to %s is dead after %d attempts (its last_error says why)",
                delivery["id"], delivery["webhook_id"], attempts,
            )  # fmt: skip
        else:
            changes["next_attempt_at"] = now + retry_delay(attempts, self._base_s, self._max_s)
        if self._on_outcome is not None:
            self._on_outcome(changes.get("state", "retrying"))
        try:
            await self._store.finish_delivery(delivery["id"], self._node, changes)
        except Exception:  # the lease runs out and the attempt is made again, same id
            log.exception("recording the outcome of webhook delivery %s failed", delivery["id"])

    async def _attempt(
        self, session: aiohttp.ClientSession, delivery: dict[str, Any], started: float
    ) -> tuple[int | None, str | None]:
        """Send one attempt; return the answer's status and, when it failed, why."""
        url = delivery["url"]
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-AgentHub-Delivery": delivery["id"],
            "X-AgentHub-Event": delivery["event_type"],
            "X-AgentHub-Signature": signature(
                _signing_secrets(delivery, started), delivery["body"], int(started)
            ),
        }
        try:
            await self._policy.check(url)  # IP literals never reach the resolver: checked here
            async with session.post(
                url, data=delivery["body"], headers=headers, allow_redirects=False
            ) as answer:
                status = answer.status
                location = answer.headers.get("Location", "nowhere")
        except DestinationRefused as refused:
            return None, str(refused)
        except TimeoutError:
            return None, f"no answer within {self._timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"redirected ({status}) to {location}: redirects are not followed"
        return status, f"the receiver answered {status}"


def _signing_secrets(delivery: dict[str, Any], now: float) -> list[str]:
    expires_at = delivery["previous_secret_expires_at"]
    previous = delivery["previous_secret"]
    rolling = previous is not None and expires_at is not None and expires_at > now
    return [delivery["secret"], previous] if rolling else [delivery["secret"]]
