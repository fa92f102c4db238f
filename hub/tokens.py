"""Operator bearer tokens: HS256 JWTs signed with the hub's secret, with scopes; revocation by `jti`.

A token is accepted when its signature is valid for the pinned algorithm (HS256; `none` and
every other algorithm are refused), it names this hub as issuer and audience, it is inside
`iat`/`nbf`..`exp` (5 s leeway for clock skew), it carries `sub` and `jti`, and its `jti` is
not in the revoked list (`RevokedTokens`).
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from hub.config import Settings
from hub.problems import Forbidden, Unauthorized
from hub.store import Store

SCOPES = ("hub:read", "hub:write", "hub:admin")
JTI_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"  # this hub issues 32 hex digits; leave room for others
_ALGORITHM = "HS256"  # pinned: a token naming any other algorithm is refused
_SECRET_FILE = "jwt.secret"  # noqa: S105 - a file name, not a secret
# Higher scopes include the lower ones.
_IMPLIED = {
    "hub:admin": set(SCOPES),
    "hub:write": {"hub:write", "hub:read"},
    "hub:read": {"hub:read"},
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request, and what they may do."""

    subject: str
    scopes: frozenset[str]
    token_id: str
    expires_at: float  # epoch seconds: a connection authenticated by this token ends then

    def require(self, scope: str) -> None:
        """Raise `Forbidden` unless this principal holds `scope`."""
        if scope not in self.scopes:
            raise Forbidden(f"this action needs the scope '{scope}'", required_scope=scope)


def load_secret(settings: Settings) -> str:
    """Return the signing secret: configured, or generated once into the data dir."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.data_dir / _SECRET_FILE
    if not path.is_file():
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _create_secret_file(path)
    return path.read_text().strip()


def _create_secret_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token and the claims an operator needs to find or revoke it later."""

    token: str
    jti: str
    subject: str
    scope: str
    expires_at: int


def issue_token(
    settings: Settings, *, scopes: list[str], subject: str, ttl_s: int | None = None
) -> IssuedToken:
    """Sign a token for `subject` with `scopes`; the answer names its `jti`."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(
            f"unknown scope {unknown[0]!r}: choose from {', '.join(SCOPES)}"
            if unknown
            else "at least one --scope is needed"
        )
    now = int(time.time())
    jti = uuid.uuid4().hex
    scope = " ".join(sorted(set(scopes)))
    expires_at = now + (ttl_s or settings.token_default_ttl_s)
    claims = {
        "sub": subject,
        "scope": scope,
        "iat": now,
        "nbf": now,
        "exp": expires_at,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "jti": jti,
    }
    token = jwt.encode(claims, load_secret(settings), algorithm=_ALGORITHM)
    return IssuedToken(token, jti, subject, scope, expires_at)


def create_token(settings: Settings, *, scopes: list[str], subject: str, ttl_s: int | None = None) -> str:
    """Sign a token for `subject` with `scopes`; return just the token."""
    return issue_token(settings, scopes=scopes, subject=subject, ttl_s=ttl_s).token


class TokenVerifier:
    """Check bearer tokens: signature, algorithm, expiry, issuer and audience."""

    def __init__(self, settings: Settings) -> None:
        self._secret = load_secret(settings)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid token or raise `Unauthorized` saying why."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from exc
        granted: set[str] = set()
        for scope in str(claims.get("scope", "")).split():
            granted |= _IMPLIED.get(scope, set())
        return Principal(
            subject=claims["sub"],
            scopes=frozenset(granted),
            token_id=claims["jti"],
            expires_at=float(claims["exp"]),
        )


class RevokedTokens:
    """Which token ids are revoked: read from the store, remembered briefly.

    The store is the truth, so a revocation made anywhere (`agenthub token revoke` writing
    the same database, another hub node, the API) is seen without a restart. Revocation is
    permanent, so a revoked id is remembered for good; that an id is *not* revoked is
    remembered for `ttl_s` (`HUB_TOKEN_REVOCATION_CACHE_S`, default 1 s). A revocation made
    elsewhere therefore takes effect within `ttl_s`, for the cost of one indexed read per
    active token per `ttl_s`; one made through this object takes effect at once. At most
    `max_entries` ids are remembered, the least recently checked forgotten first.
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._checked: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    async def is_revoked(self, jti: str) -> bool:
        """Say whether the token `jti` has been revoked."""
        now = self._clock()
        cached = self._checked.get(jti)
        if cached is not None and (cached[0] or now - cached[1] < self._ttl):
            return cached[0]
        revoked = await self._store.get_revoked_token(jti) is not None
        self._remember(jti, revoked, now)
        return revoked

    async def revoke(self, jti: str, *, reason: str) -> dict[str, Any]:
        """Revoke the token `jti` for good; return the record (the first one if it already was)."""
        record = await self._store.revoke_token(jti, reason=reason, revoked_at=time.time())
        self._remember(jti, True, self._clock())
        return record

    def _remember(self, jti: str, revoked: bool, now: float) -> None:
        self._checked[jti] = (revoked, now)
        self._checked.move_to_end(jti)
        while len(self._checked) > self._max:
            self._checked.popitem(last=False)
