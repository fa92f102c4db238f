"""Refuse by default: every route needs a credential unless marked public.

Order of checks: an `/api/` or `/ws/` route must declare its scope (`requires`); a page
needs `hub:read` unless it says otherwise. Then the caller proves who it is: a bearer token
that is valid (signature, algorithm, issuer, audience, times) and not revoked, or the session
cookie of a signed-in operator (401 for the API, a redirect to `/signin` for pages). A request
that changes something with a session cookie must carry that session's CSRF token in
`X-CSRF-Token` (403). Last, the credential must hold the route's scope (403).
Only agents' own paths pass untouched: `/socket.io/` (certificates, checked by the transport)
and `/static/` (assets).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from hub.api.signatures import AGENT_SIGNATURE, SIGNATURES, SIGNED_AGENT
from hub.identity import client_address
from hub.keys import PRINCIPAL, REVOKED_TOKENS, SESSION, SESSIONS, SETTINGS, VERIFIER
from hub.problems import Forbidden, Unauthorized
from hub.sessions import Session, cookie_name
from hub.tokens import Principal

RouteHandler = TypeVar("RouteHandler", bound=Callable[..., Awaitable[web.StreamResponse]])
_PROTECTED_PREFIXES = ("/api/", "/ws/")
_UNGUARDED_PREFIXES = ("/socket.io/", "/static/")
_PAGE_SCOPE = "hub:read"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SCOPE_ATTR = "_hub_scope"
CSRF_HEADER = "X-CSRF-Token"


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
    if origin in request.app[SETTINGS].allowed_origins or _same_origin(origin, request):
        return
    raise Forbidden(f"WebSocket connections from {origin} are not allowed (HUB_ALLOWED_ORIGINS)")


def _same_origin(origin: str, request: web.Request) -> bool:
    # Scheme, host and port: a page on another port of the same host is another origin, even
    # though the browser counts it as the same site and sends it the SameSite cookie.
    try:
        return URL(origin).origin() == request.url.origin()
    except ValueError:  # not a URL at all
        return False


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    if request.path.startswith("/ws/"):  # browsers cannot set headers on a WebSocket
        return request.query.get("access_token") or request.cookies.get("access_token")
    return None


@web.middleware
def auth_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Authenticate every path but the agents' own, and check the handler's declared scope."""
    if request.path.startswith(_UNGUARDED_PREFIXES):
        return handler(request)
    return _authenticated(request, handler)


async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    is_page = not request.path.startswith(_PROTECTED_PREFIXES)
    route_handler = request.match_info.handler
    if not hasattr(route_handler, _SCOPE_ATTR):
        if request.match_info.http_exception is not None:
            raise request.match_info.http_exception
        if not is_page:
            raise Unauthorized("this route declares no scope and is refused")
    scope = getattr(route_handler, _SCOPE_ATTR, _PAGE_SCOPE)
    if scope is None:
        return await handler(request)
    if scope == AGENT_SIGNATURE:
        request[SIGNED_AGENT] = await request.app[SIGNATURES].verify(request)
        return await handler(request)
    if request.path.startswith("/ws/"):
        _check_origin(request)
    token = None if is_page else _bearer(request)  # pages are for people: signed in, with a session
    if token is not None:
        who = await _token_principal(request, token)
    elif (session := await signed_in(request)) is not None:
        _check_csrf(request, session)
        who = session.principal()
        request[SESSION] = session
    elif is_page:
        raise web.HTTPSeeOther(URL("/signin").with_query(next=request.path_qs))
    else:
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>) or a session")
    who.require(scope)
    request[PRINCIPAL] = who
    return await handler(request)


async def _token_principal(request: web.Request, token: str) -> Principal:
    who = request.app[VERIFIER].verify(token)
    if await request.app[REVOKED_TOKENS].is_revoked(who.token_id):
        raise Unauthorized("the token has been revoked")
    return who


async def signed_in(request: web.Request) -> Session | None:
    """Return the live session whose cookie `request` carries, if any."""
    value = request.cookies.get(cookie_name(request.app[SETTINGS]))
    return await request.app[SESSIONS].find(value) if value else None


def _check_csrf(request: web.Request, session: Session) -> None:
    # The cookie rides along with any request the browser makes, whoever made the page that
    # asks; only pages of this hub can read the token to echo it.
    if request.method in _SAFE_METHODS:
        return
    if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
        raise Forbidden(f"the {CSRF_HEADER} header is missing or does not match this session")


def caller(request: web.Request) -> str:
    """Name who made `request`, for per-caller limits: token subject, signing agent or TCP peer."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        return f"principal:{principal.subject}"
    if SIGNED_AGENT in request:
        return f"agent:{request[SIGNED_AGENT]}"
    return peer(request)


def peer(request: web.Request) -> str:
    """Name the client of `request`: its TCP peer, or the address a trusted proxy (only) names."""
    return f"address:{client_address(request, request.app[SETTINGS].trusted_proxies)}"
