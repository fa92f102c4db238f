"""Rate limits: token buckets per client address (before authentication) and per caller.

The address bucket bounds what anyone can make the hub do before a credential is checked
(bad tokens, bad signatures, big bodies); the caller bucket (token subject or signing agent)
then shares the hub fairly among authenticated callers, even behind one NAT or proxy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable

from aiohttp import web
from aiohttp.typedefs import Handler

from hub.api.auth import caller, peer
from hub.limits import TokenBuckets
from hub.problems import RESPONSE_HEADERS, RateLimited

ADDRESS_LIMITS = web.AppKey("address_limits", TokenBuckets)
CALLER_LIMITS = web.AppKey("caller_limits", TokenBuckets)


@web.middleware
def address_rate_limit_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Limit every `/api/` request and sign-in by its TCP peer, before credentials cost anything."""
    if request.path.startswith("/api/") or request.path == "/signin":
        _spend(request, request.app[ADDRESS_LIMITS], peer(request))
    return handler(request)


@web.middleware
def rate_limit_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Limit every authenticated `/api/` request by its caller; the headers then speak of that bucket."""
    key = caller(request)
    if request.path.startswith("/api/") and key != peer(request):
        _spend(request, request.app[CALLER_LIMITS], key)
    return handler(request)


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
