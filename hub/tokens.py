"""Operator bearer tokens: HS256 JWTs signed with the hub's secret, with scopes."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from hub.config import Settings
from hub.problems import Forbidden, Unauthorized

SCOPES = ("hub:read", "hub:write", "hub:admin")
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


def create_token(settings: Settings, *, scopes: list[str], subject: str, ttl_s: int | None = None) -> str:
    """Sign a token for `subject` with `scopes`."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(
            f"unknown scope {unknown[0]!r}: choose from {', '.join(SCOPES)}"
            if unknown
            else "at least one --scope is needed"
        )
    now = int(time.time())
    claims = {
        "sub": subject,
        "scope": " ".join(sorted(set(scopes))),
        "iat": now,
        "nbf": now,
        "exp": now + (ttl_s or settings.token_default_ttl_s),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, load_secret(settings), algorithm=_ALGORITHM)


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
        return Principal(subject=claims["sub"], scopes=frozenset(granted), token_id=claims["jti"])
