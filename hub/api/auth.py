"""Refuse by default: every `/api/` and `/ws/` route needs a token unless marked public.

Order of checks: a route must declare its scope (`requires`); then a bearer token must be
present (401), valid (signature, algorithm, issuer, audience, times: 401), not revoked
(401 "the token has been revoked"), and hold the route's scope (403).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from hub.api.signatures import AGENT_SIGNATURE, SIGNATURES, SIGNED_AGENT
from hub.keys import PRINCIPAL, REVOKED_TOKENS, SETTINGS, VERIFIER
from hub.problems import Forbidden, Unauthorized

RouteHandler = TypeVar("RouteHandler", bound=Callable[..., Awaitable[web.StreamResponse]])
_PROTECTED_PREFIXES = ("/api/", "/ws/")
_SCOPE_ATTR = "_hub_scope"


def requires(scope: str | None) -> Callable[[RouteHandler], RouteHandler]:
    """Declare the scope a handler needs; `None` marks it public."""

    def mark(handler: RouteHandler) -> RouteHandler:
        setattr(handler, _SCOPE_ATTR, scope)
        return handler

    return mark


def _check_origin(request: web.Request) -> None:
    # A browser attaches the token cookie to a WebSocket any site opens: only pages of this hub
    # (same host) or of an allowed origin may use it. Clients that are not browsers send no Origin.
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if origin in request.app[SETTINGS].allowed_origins or URL(origin).host == request.url.host:
        return
    raise Forbidden(f"WebSocket connections from {origin} are not allowed (HUB_ALLOWED_ORIGINS)")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    if request.path.startswith("/ws/"):  # browsers cannot set headers on a WebSocket
        return request.query.get("access_token") or request.cookies.get("access_token")
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every protected path and check the handler's declared scope."""
    if not request.path.startswith(_PROTECTED_PREFIXES):
        return await handler(request)
    route_handler = request.match_info.handler
    if not hasattr(route_handler, _SCOPE_ATTR):
        if request.match_info.http_exception is not None:
            raise request.match_info.http_exception
        raise Unauthorized("this route declares no scope and is refused")
    scope = getattr(route_handler, _SCOPE_ATTR)
    if scope is None:
        return await handler(request)
    if scope == AGENT_SIGNATURE:
        request[SIGNED_AGENT] = await request.app[SIGNATURES].verify(request)
        return await handler(request)
    if request.path.startswith("/ws/"):
        _check_origin(request)
    token = _bearer(request)
    if token is None:
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    who = request.app[VERIFIER].verify(token)
    if await request.app[REVOKED_TOKENS].is_revoked(who.token_id):
        raise Unauthorized("the token has been revoked")
    who.require(scope)
    request[PRINCIPAL] = who
    return await handler(request)


def caller(request: web.Request) -> str:
    """Name who made `request`, for per-caller limits: token subject, signing agent or TCP peer."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        return f"principal:{principal.subject}"
    if SIGNED_AGENT in request:
        return f"agent:{request[SIGNED_AGENT]}"
    return peer(request)


def peer(request: web.Request) -> str:
    """Name the TCP peer of `request`: never a forwarded header, which a client could choose."""
    return f"address:{request.remote}"
