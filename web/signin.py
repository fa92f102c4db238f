"""Signing in and out of the pages, and the headers every page is served with.

Sign-in is a plain form post. Before a session exists, the form is protected against
cross-site posts by a double-submit token: a random value in a SameSite=Strict cookie that
the form must repeat. A successful sign-in starts a session (see `hub.sessions`) and sets its
cookie HttpOnly, Secure and SameSite=Strict; sign-out ends it on every node. Failures are
recorded in the audit log and count towards the account's lockout (see `hub.users`).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from hub import __version__
from hub.api.audit import record_action
from hub.api.auth import requires, signed_in
from hub.config import Settings
from hub.identity import client_address
from hub.keys import SESSION, SESSIONS, SETTINGS, USERS
from hub.problems import Forbidden, PayloadTooLarge, Unavailable
from hub.sessions import cookie_name
from hub.users import AccountLocked, SignInRefused

routes = web.RouteTableDef()
_FORM_COOKIE = "signin"  # the double-submit token of the sign-in form
_FORM_COOKIE_MAX_AGE_S = 3600
_MAX_FORM_BYTES = 8192  # a name, a password and two tokens; more is not a sign-in
_LOCAL_PATH = re.compile(r"/(?![/\\])[!-~]{0,2047}")
# Pages load nothing from elsewhere and run no inline script: an injected tag does nothing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages carry CSRF tokens and operators' data
}


async def page_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Give every HTML answer the pages' security headers, unless its handler chose its own."""
    if response.content_type == "text/html":
        for name, value in _PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    elif SESSION in request:  # an operator's data fetched by a page: no shared cache keeps it
        response.headers.setdefault("Cache-Control", "no-store")


@routes.get("/signin")
@requires(None)
async def signin_page(request: web.Request) -> web.StreamResponse:
    """Show the sign-in form; a signed-in operator goes straight on."""
    target = _local_target(request.query.get("next"))
    if await signed_in(request) is not None:
        return _redirect(target)
    return _form(request, target=target)


@routes.post("/signin")
@requires(None)
async def signin(request: web.Request) -> web.StreamResponse:
    """Check the name and password; start a session or show the form again saying why not."""
    if request.content_length is None or request.content_length > _MAX_FORM_BYTES:
        raise PayloadTooLarge(f"a sign-in form is at most {_MAX_FORM_BYTES} bytes, with its length stated")
    form = await request.post()
    target = _local_target(_field(form, "next"))
    name = _field(form, "username").strip()
    if not _form_token_matches(request, form):
        return _form(request, target=target, name=name, status=403, error=_EXPIRED)
    try:
        user = await request.app[USERS].authenticate(name, _field(form, "password"))
    except (SignInRefused, AccountLocked) as exc:
        status = 401 if isinstance(exc, SignInRefused) else 429
        await _audit(request, name if exc.known else "?", status=status)
        response = _form(request, target=target, name=name, status=status, error=str(exc))
        if isinstance(exc, AccountLocked):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except Unavailable as exc:
        response = _form(request, target=target, name=name, status=503, error=exc.detail)
        response.headers["Retry-After"] = str(max(1, exc.retry_after_ms // 1000))
        return response
    settings = request.app[SETTINGS]
    cookie_value, _ = await request.app[SESSIONS].start(
        user["name"], address=client_address(request, settings.trusted_proxies)
    )
    await _audit(request, user["name"], status=303)
    response = _redirect(target)
    _set_cookie(response, settings, "session", cookie_value, max_age=settings.session_max_s)
    response.del_cookie(cookie_name(settings, _FORM_COOKIE), path="/")
    return response


@routes.post("/signout")
@requires(None)
async def signout(request: web.Request) -> web.StreamResponse:
    """End the session (its form must carry the session's CSRF token) and show the sign-in form."""
    settings = request.app[SETTINGS]
    session = await signed_in(request)
    if session is not None:
        form = await request.post()
        if not session.csrf_matches(_field(form, "csrf_token")):
            raise Forbidden("the sign-out form does not carry this session's CSRF token")
        await request.app[SESSIONS].end(request.cookies[cookie_name(settings)])
        await _audit(request, session.user, status=303)
    response = _redirect("/signin")
    response.del_cookie(cookie_name(settings), path="/")
    return response


_EXPIRED = "The sign-in form had expired; please sign in again."


def _form(
    request: web.Request, *, target: str, name: str = "", status: int = 200, error: str | None = None
) -> web.Response:
    settings = request.app[SETTINGS]
    token = request.cookies.get(cookie_name(settings, _FORM_COOKIE))
    if not token or len(token) > 100:
        token = secrets.token_urlsafe(32)
    context: dict[str, Any] = {
        "session": None,
        "version": __version__,
        "form_token": token,
        "next": target,
        "username": name,
        "error": error,
    }
    response = aiohttp_jinja2.render_template("signin.html", request, context, status=status)
    _set_cookie(response, settings, _FORM_COOKIE, token, max_age=_FORM_COOKIE_MAX_AGE_S)
    return response


def _form_token_matches(request: web.Request, form: MultiDictProxy[Any]) -> bool:
    expected = request.cookies.get(cookie_name(request.app[SETTINGS], _FORM_COOKIE))
    presented = _field(form, "csrf_token")
    return bool(expected) and secrets.compare_digest((expected or "").encode(), presented.encode())


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _local_target(target: str | None) -> str:
    # Only a path of this hub, in printable ASCII: "//evil.example", "/\\evil.example" and
    # "/\t/evil.example" (browsers drop tabs and newlines from URLs) would all leave it.
    if target and _LOCAL_PATH.fullmatch(target):
        return target
    return "/"


def _redirect(target: str) -> web.Response:
    return web.Response(status=303, headers={"Location": target})


def _set_cookie(
    response: web.StreamResponse, settings: Settings, purpose: str, value: str, *, max_age: float
) -> None:
    response.set_cookie(
        cookie_name(settings, purpose),
        value,
        max_age=int(max_age),
        path="/",
        httponly=True,
        secure=not settings.dev_insecure,
        samesite="Strict",
    )


async def _audit(request: web.Request, name: str, *, status: int) -> None:
    # Refused sign-ins name the account only when it exists: what was typed may be a password.
    await record_action(request, actor=f"user:{name}", status=status)
