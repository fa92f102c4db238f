"""Web sessions of signed-in operators: opaque cookies, kept in the store, ended by sign-out.

The cookie holds 32 random bytes; the store keeps only their SHA-256, so a copy of the
database signs nobody in. A session ends `session_idle_s` after it was last used (pages, API
calls and open dashboards all count) and at the latest `session_max_s` after sign-in; it also
ends when its user is removed or given a new password. Being in the store, a sign-out on one
hub node ends the session on every node. Each session carries its own CSRF token, which every
state-changing request made with the cookie must echo (`X-CSRF-Token`, or the `csrf_token`
field of a form).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from hub.config import Settings
from hub.store import Store
from hub.tokens import SCOPES, Principal

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
# A role is the API scopes its holder gets: pages and API calls check the same scopes.
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "viewer": frozenset({"hub:read"}),
    "operator": frozenset({"hub:read", "hub:write"}),
    "admin": frozenset(SCOPES),
}
_TOUCH_EVERY_S = 60.0  # sliding the idle expiry on every request would make each one a write


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in operator's session, as the pages and the API see it."""

    id_hash: str
    user: str
    role: str
    csrf_token: str
    expires_at: float
    ends_at: float  # the absolute end (sign-in + session_max_s): a dashboard socket closes then

    @property
    def scopes(self) -> frozenset[str]:
        return ROLE_SCOPES.get(self.role, frozenset())

    def principal(self) -> Principal:
        """Return who this session acts as, for scope checks, rate limits and the audit log."""
        return Principal(
            subject=f"user:{self.user}",
            scopes=self.scopes,
            token_id=f"session:{self.id_hash[:16]}",
            expires_at=self.ends_at,
        )

    def csrf_matches(self, presented: str | None) -> bool:
        """Say whether `presented` is this session's CSRF token (compared in constant time)."""
        # As bytes: a str compare refuses non-ASCII input with TypeError, and a header may hold any.
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token.encode())


def cookie_name(settings: Settings, purpose: str = "session") -> str:
    """Name a cookie of the hub's pages: `__Host-` prefixed unless the hub serves plain HTTP."""
    # `__Host-`: the browser keeps it only if it is Secure, for path / and this host alone, so a
    # sibling subdomain cannot plant or overwrite it. Plain-HTTP development cannot keep Secure ones.
    name = f"agenthub_{purpose}"
    return name if settings.dev_insecure else f"__Host-{name}"


def _hash(cookie_value: str) -> str:
    return hashlib.sha256(cookie_value.encode()).hexdigest()


class SessionService:
    """Start, find and end web sessions."""

    def __init__(self, settings: Settings, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._idle_s = settings.session_idle_s
        self._max_s = settings.session_max_s
        self._clock = clock

    async def start(self, user: str, *, address: str | None) -> tuple[str, Session]:
        """Open a session for `user`; return the cookie value (shown nowhere else) and the session."""
        now = self._clock()
        cookie_value = secrets.token_urlsafe(32)
        id_hash = _hash(cookie_value)
        record = {
            "id_hash": id_hash,
            "user_name": user,
            "csrf_token": secrets.token_urlsafe(32),
            "created_at": now,
            "last_seen_at": now,
            "expires_at": min(now + self._idle_s, now + self._max_s),
            "address": address,
        }
        await self._store.prune_sessions(now)  # sign-ins are rare: a fitting time to sweep
        await self._store.insert_session(record)
        session = await self._find_hash(id_hash)
        if session is None:  # its user was removed in between
            raise LookupError(f"no user {user!r}")
        return cookie_value, session

    async def find(self, cookie_value: str) -> Session | None:
        """Return the live session behind a cookie value, or None; using it slides its idle expiry."""
        if not 20 <= len(cookie_value) <= 100:  # not one of ours: spare the store
            return None
        return await self._find_hash(_hash(cookie_value))

    async def alive(self, id_hash: str) -> bool:
        """Say whether the session `id_hash` still stands (counts as a use, like `find`)."""
        return await self._find_hash(id_hash) is not None

    async def end(self, cookie_value: str) -> None:
        """End the session behind a cookie value (sign-out); unknown values are ignored."""
        await self._store.delete_session(_hash(cookie_value))

    async def _find_hash(self, id_hash: str) -> Session | None:
        record = await self._store.get_session(id_hash)
        if record is None:
            return None
        now = self._clock()
        if record["expires_at"] <= now:
            await self._store.delete_session(id_hash)
            return None
        ends_at = record["created_at"] + self._max_s
        if now - record["last_seen_at"] >= _TOUCH_EVERY_S:
            record["expires_at"] = min(now + self._idle_s, ends_at)
            await self._store.touch_session(id_hash, last_seen_at=now, expires_at=record["expires_at"])
        return _session(record, ends_at)


def _session(record: dict[str, Any], ends_at: float) -> Session:
    return Session(
        id_hash=record["id_hash"],
        user=record["user_name"],
        role=record["role"],
        csrf_token=record["csrf_token"],
        expires_at=record["expires_at"],
        ends_at=ends_at,
    )
