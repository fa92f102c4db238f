"""Operator accounts: names, roles and Argon2id password hashes, with lockout after failures.

Passwords are hashed with argon2-cffi's defaults (Argon2id, RFC 9106's low-memory profile) in
a worker thread, at most two at a time, so sign-ins never stall ingest and a burst of them
cannot take the machine's memory. After `signin_max_failures` failed sign-ins in a row an
account is locked for `signin_lockout_s`, doubling with each further failure up to
`signin_lockout_max_s`; attempts while locked are refused without checking the password, and
a successful sign-in clears the count. Unknown names cost the same hash check as known ones.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hub.config import Settings
from hub.sessions import ROLES
from hub.store import Store

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # a longer "password" only makes the hash cost more
_HASHER = PasswordHasher()


class SignInRefused(Exception):
    """The name and password do not sign in: one message for every reason, so names stay secret."""

    def __str__(self) -> str:
        return "wrong user name or password"


class AccountLocked(Exception):
    """Too many failed sign-ins: the account takes no attempt for `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"too many failed sign-ins: try again in {self.retry_after_s} s"


@functools.cache
def _unknown_user_hash() -> str:
    # Checked against when the name is unknown, so a wrong name takes as long as a wrong password.
    return _HASHER.hash("agenthub: no such user")


def check_user_name(name: str) -> str:
    """Return `name` if it is a valid user name, else raise ValueError saying why."""
    if not USER_NAME.match(name):
        raise ValueError(
            f"user name {name!r} is not valid: 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    """Return `role` if it is a known role, else raise ValueError naming the choices."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    """Return `password` if it is long enough to keep, else raise ValueError saying why."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"the password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"the password must be at most {MAX_PASSWORD_CHARS} characters")
    return password


class Users:
    """Create, change, remove and authenticate operator accounts."""

    def __init__(self, settings: Settings, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._max_failures = settings.signin_max_failures
        self._lockout_s = settings.signin_lockout_s
        self._lockout_max_s = settings.signin_lockout_max_s
        self._clock = clock
        self._hash_slots = asyncio.Semaphore(2)  # each hash takes 64 MiB and a core for ~50 ms

    async def add(self, name: str, *, role: str, password: str) -> dict[str, Any]:
        """Create an account; raise ValueError for a bad name, role or password, or a taken name."""
        check_user_name(name)
        check_role(role)
        now = self._clock()
        record = {
            "name": name,
            "role": role,
            "password_hash": await self._hash(check_password(password)),
            "created_at": now,
            "password_changed_at": now,
        }
        if not await self._store.insert_user(record):
            raise ValueError(f"user {name!r} already exists")
        return await self._view(name)

    async def list(self) -> list[dict[str, Any]]:
        """Return every account, without password hashes."""
        return await self._store.list_users()

    async def set_password(self, name: str, password: str) -> None:
        """Give `name` a new password, unlock it, and end its sessions."""
        fields = {
            "password_hash": await self._hash(check_password(password)),
            "password_changed_at": self._clock(),
            "failed_signins": 0,
            "locked_until": 0.0,
        }
        await self._update(name, fields)
        await self._store.delete_sessions(name)

    async def set_role(self, name: str, role: str) -> None:
        """Give `name` another role; its open sessions take it at their next request."""
        await self._update(name, {"role": check_role(role)})

    async def unlock(self, name: str) -> None:
        """Clear `name`'s failed sign-ins and lockout."""
        await self._update(name, {"failed_signins": 0, "locked_until": 0.0})

    async def remove(self, name: str) -> None:
        """Delete `name` and end its sessions."""
        if not await self._store.delete_user(name):
            raise LookupError(f"no user {name!r}")

    async def authenticate(self, name: str, password: str) -> dict[str, Any]:
        """Return the account `name` if `password` is its password; raise SignInRefused or AccountLocked."""
        user = await self._store.get_user(name) if USER_NAME.match(name) else None
        now = self._clock()
        if user is not None and user["locked_until"] > now:
            raise AccountLocked(max(1, math.ceil(user["locked_until"] - now)))
        candidate = password[:MAX_PASSWORD_CHARS]
        known_hash = user["password_hash"] if user else _unknown_user_hash()
        if not await self._matches(known_hash, candidate) or user is None:
            if user is not None:
                await self._failed(name, now)
            raise SignInRefused
        await self._store.update_user(name, {"failed_signins": 0, "locked_until": 0.0, "last_signin_at": now})
        if _HASHER.check_needs_rehash(user["password_hash"]):  # parameters were raised since
            await self._store.update_user(name, {"password_hash": await self._hash(candidate)})
        return await self._view(name)

    async def _failed(self, name: str, now: float) -> None:
        failures = await self._store.add_signin_failure(name)
        if failures is None or failures < self._max_failures:
            return
        lockout = min(self._lockout_s * 2 ** min(failures - self._max_failures, 30), self._lockout_max_s)
        await self._store.update_user(name, {"locked_until": now + lockout})
        raise AccountLocked(max(1, math.ceil(lockout)))

    async def _hash(self, password: str) -> str:
        async with self._hash_slots:
            return await asyncio.to_thread(_HASHER.hash, password)

    async def _matches(self, password_hash: str, password: str) -> bool:
        async with self._hash_slots:
            try:
                return await asyncio.to_thread(_HASHER.verify, password_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    async def _update(self, name: str, fields: dict[str, Any]) -> None:
        if not await self._store.update_user(name, fields):
            raise LookupError(f"no user {name!r}")

    async def _view(self, name: str) -> dict[str, Any]:
        user = await self._store.get_user(name)
        if user is None:
            raise LookupError(f"no user {name!r}")
        return {key: value for key, value in user.items() if key != "password_hash"}
