"""Rate limits: a token bucket per principal (or per client address on public routes)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from hub.api.auth import caller
from hub.keys import SETTINGS
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


RATE_LIMITS = web.AppKey("rate_limits", TokenBuckets)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Limit every `/api/` request and say where the caller stands in X-RateLimit-* headers."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    buckets = request.app[RATE_LIMITS]
    decision = buckets.take(caller(request))
    request[RESPONSE_HEADERS].update(
        {
            "X-RateLimit-Limit": str(buckets.burst),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(math.ceil(time.time() + decision.reset_s)),
        }
    )
    if not decision.allowed:
        settings = request.app[SETTINGS]
        raise RateLimited(
            f"rate limit exceeded: {settings.rate_limit_burst} requests at once, "
            f"{settings.rate_limit_per_s:g} a second sustained",
            retry_after_s=max(1, math.ceil(decision.retry_after_s)),
        )
    return await handler(request)
