"""The audit log over HTTP: the middleware that records operator writes, listing, token revocation.

`audit_middleware` is the one place API writes are recorded: every request under `/api/`
other than GET, HEAD and OPTIONS made with a valid token, whatever its outcome (the
handler's answer, a 4xx problem it raised, a 500, an idempotent replay), with the status.
It sits inside the auth middleware, which names the principal, and inside rate limiting:
requests refused there (401 no or bad token, 403 missing scope, 429) are cheap refusals
that must stay cheap, so they are not recorded; otherwise any token holder could make the
hub write audit entries without bound. The entry is committed before the answer is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.spec import ApiRoutes
from hub.audit import Action, AuditEntry
from hub.identity import client_address
from hub.keys import AUDIT, PRINCIPAL, REVOKED_TOKENS, SETTINGS
from hub.problems import CORRELATION_ID, HubError
from hub.tokens import JTI_PATTERN

log = logging.getLogger(__name__)
api = ApiRoutes("audit")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
def audit_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Record every write under `/api/` made with a valid token, whatever its outcome."""
    if request.method in _READS or not request.path.startswith("/api/"):
        return handler(request)
    return _audited(request, handler)


async def _audited(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except Exception as exc:
        await _record(request, _status_of(exc))
        raise
    await _record(request, response.status)
    return response


def _status_of(exc: Exception) -> int:
    if isinstance(exc, HubError):
        return exc.status
    if isinstance(exc, web.HTTPException):
        return exc.status
    return 500  # what the problem middleware will answer


async def _record(request: web.Request, status: int) -> None:
    who = request.get(PRINCIPAL)
    if who is not None:
        await record_action(request, actor=who.subject, token_id=who.token_id, status=status)


async def record_action(
    request: web.Request, *, actor: str, status: int, token_id: str | None = None
) -> None:
    """Append what `request` did, by `actor`, to the audit log; a failure is logged, not raised."""
    match = request.match_info
    resource = match.route.resource
    action = Action(
        actor=actor,
        token_id=token_id,
        action=match.route.name or str(getattr(match.handler, "__name__", "unknown")),
        method=request.method,
        path=resource.canonical if resource is not None else request.path,
        target=dict(match),
        status=status,
        correlation_id=request.get(CORRELATION_ID),
        client=_peer(request),
    )
    try:
        await request.app[AUDIT].append(action)
    except Exception:
        # The action itself is done: answering it as failed would mislead the client.
        log.exception(
            "could not record %s %s by %s in the audit log (correlation id %s)",
            action.method, action.path, action.actor, action.correlation_id,
        )  # fmt: skip


def _peer(request: web.Request) -> str | None:
    # The TCP peer, or the client a trusted proxy names: a forwarded header from anyone else is
    # the client's word, not a fact. A unix socket's peer has no address.
    return client_address(request, request.app[SETTINGS].trusted_proxies) or "unix"


class AuditQuery(PageQuery):
    actor: str | None = Field(
        None, min_length=1, max_length=256, description="who acted: a token subject, or local:<user> (CLI)"
    )
    action: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="what was done: an API operation id (e.g. revoke_token) or a CLI action",
    )
    since: float | None = Field(None, description="entries with ts >= since (epoch seconds)")
    until: float | None = Field(None, description="entries with ts < until (epoch seconds)")


@api.get("/api/v1/audit", scope="hub:admin", query=AuditQuery, response=PageOf[AuditEntry])
async def list_audit(request: web.Request, *, query: AuditQuery) -> dict[str, Any]:
    """List audit log entries, newest first, with their chain hashes.

    Entries are ordered by id, newest first; pages follow with the cursor. Each entry carries
    `prev_hash` and `hash`, so a client can check the chain itself (see `agenthub audit verify`).
    """
    return await paginate(
        request, query, request.app[AUDIT].page,
        actor=query.actor, action=query.action, since=query.since, until=query.until,
    )  # fmt: skip


class TokenPath(BaseModel):
    jti: str = Field(pattern=JTI_PATTERN, description="the token's id (its `jti` claim)")


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="why, for the next person who looks")


class RevokedToken(TypedDict):
    jti: str
    revoked_at: float
    reason: str


@api.post(
    "/api/v1/tokens/{jti}:revoke",
    scope="hub:admin",
    path_params=TokenPath,
    body=RevokeBody,
    response=RevokedToken,
)
async def revoke_token(request: web.Request, *, path: TokenPath, body: RevokeBody) -> dict[str, Any]:
    """Revoke an operator token by its id: every hub node refuses it from then on.

    This node refuses it at once, others within `HUB_TOKEN_REVOCATION_CACHE_S`. Revoking a
    token again is harmless: the answer is the first revocation.
    """
    return await request.app[REVOKED_TOKENS].revoke(path.jti, reason=body.reason)
