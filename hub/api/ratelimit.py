"""Rate limits: token buckets per client address (before authentication) and per caller.

The address bucket bounds what anyone can make the hub do before a credential is checked
(bad tokens, bad signatures, big bodies); the caller bucket (token subject or signing agent)
then shares the hub fairly among authenticated callers, even behind one NAT or proxy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from hub.api.auth import caller, peer
from hub.problems import RESPONSE_HEADERS, RateLimited


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until one request is allowed again


class TokenBuckets:
    """One bucket of `burst` tokens per key, refilled at `rate` tokens a second.

    Buckets live in this process: with several hub nodes each node enforces the limit on
    the requests it serves. The least recently used bucket goes first when `max_keys` is
    reached; a forgotten bucket is a full one, so forgetting never limits anyone.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> Decision:
        """Spend one token of `key`'s bucket if it has one."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[key] = (tokens, now)  # re-inserted last: the dict keeps LRU order
        if len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return Decision(
            allowed=allowed,
            remaining=math.floor(tokens),
            reset_s=(self.burst - tokens) / self.rate,
            retry_after_s=0.0 if allowed else (1 - tokens) / self.rate,
        )


ADDRESS_LIMITS = web.AppKey("address_limits", TokenBuckets)
CALLER_LIMITS = web.AppKey("caller_limits", TokenBuckets)


@web.middleware
async def address_rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Limit every `/api/` request by its TCP peer, before its credentials cost anything."""
    if request.path.startswith("/api/"):
        _spend(request, request.app[ADDRESS_LIMITS], peer(request))
    return await handler(request)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Limit every authenticated `/api/` request by its caller; the headers then speak of that bucket."""
    key = caller(request)
    if request.path.startswith("/api/") and key != peer(request):
        _spend(request, request.app[CALLER_LIMITS], key)
    return await handler(request)


def _spend(request: web.Request, buckets: TokenBuckets, key: str) -> None:
    decision = buckets.take(key)
    request[RESPONSE_HEADERS].update(
        {
            "X-RateLimit-Limit": str(buckets.burst),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(math.ceil(time.time() + decision.reset_s)),
        }
    )
    if not decision.allowed:
        raise RateLimited(
            f"rate limit exceeded: {buckets.burst} requests at once, {buckets.rate:g} a second sustained",
            retry_after_s=max(1, math.ceil(decision.retry_after_s)),
        )
