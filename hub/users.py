"""Operator accounts: names, roles and Argon2id password hashes, with lockout after failures.

Passwords are hashed with argon2-cffi's defaults (Argon2id, RFC 9106's low-memory profile) in
a worker thread, at most two at a time, so sign-ins never stall ingest and a burst of them
cannot take the machine's memory. After `signin_max_failures` failed sign-ins in a row an
account is locked for `signin_lockout_s`, doubling with each further failure up to
`signin_lockout_max_s`; attempts while locked are refused without checking the password, and
a successful sign-in clears the count. Attempts on one name are checked one at a time, so a
burst of guesses gets no further than the same guesses in a row. Unknown names cost the same
hash check as known ones and are locked out the same way (in memory), so no answer tells
whether a name is an account. The price of locking by account: whoever knows a name can keep
it locked; `agenthub users unlock` lifts a lockout, and bearer tokens still work meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hub.config import Settings
from hub.problems import Unavailable
from hub.sessions import ROLES
from hub.store import Store
from hub.turns import Turns

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # a longer "password" only makes the hash cost more
_HASHER = PasswordHasher()
_MAX_WAITING = 32  # sign-ins queued for a hash check; more are answered 503 rather than held in memory
_MAX_UNKNOWN_NAMES = 10_000  # failed names that are no account, remembered for their lockout


class SignInRefused(Exception):
    """The name and password do not sign in: one message for every reason, so names stay secret."""

    def __init__(self, *, known: bool) -> None:
        super().__init__()
        self.known = known  # for the audit log only: a name that is no account may be a password

    def __str__(self) -> str:
        return "wrong user name or password"


class AccountLocked(Exception):
    """Too many failed sign-ins: the name takes no attempt for `retry_after_s`."""

    def __init__(self, retry_after_s: int, *, known: bool) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s
        self.known = known

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
        self._turns = Turns()
        self._signing_in = 0
        self._unknown: OrderedDict[str, tuple[int, float]] = OrderedDict()  # name -> failures, locked until

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
        """Return the account `name` if `password` is its password; raise SignInRefused or AccountLocked.

        Raises `Unavailable` when too many sign-ins already wait for a hash check.
        """
        if self._signing_in >= _MAX_WAITING:
            raise Unavailable("too many sign-ins at once: try again in a few seconds", retry_after_ms=2000)
        self._signing_in += 1
        try:
            # One attempt per name at a time: each reads the lockout its predecessor left, so a
            # burst of guesses cannot all be checked before the first failures are counted.
            async with self._turns(name):
                return await self._attempt(name, password[:MAX_PASSWORD_CHARS])
        finally:
            self._signing_in -= 1

    async def _attempt(self, name: str, password: str) -> dict[str, Any]:
        user = await self._store.get_user(name) if USER_NAME.match(name) else None
        now, known = self._clock(), user is not None
        locked_until = user["locked_until"] if user else self._unknown.get(name, (0, 0.0))[1]
        if locked_until > now:
            raise AccountLocked(max(1, math.ceil(locked_until - now)), known=known)
        stored_hash = user["password_hash"] if user else await asyncio.to_thread(_unknown_user_hash)
        if await self._matches(stored_hash, password) and user is not None:
            await self._store.update_user(
                name, {"failed_signins": 0, "locked_until": 0.0, "last_signin_at": now}
            )
            if _HASHER.check_needs_rehash(stored_hash):  # parameters were raised since
                await self._store.update_user(name, {"password_hash": await self._hash(password)})
            return await self._view(name)
        # Unknown names count and lock the same way, so the answers never tell which names exist.
        failures = await self._store.add_signin_failure(name) if user else self._unknown_failure(name)
        if failures is not None and failures >= self._max_failures:
            lockout = min(self._lockout_s * 2 ** min(failures - self._max_failures, 30), self._lockout_max_s)
            if user:
                await self._store.update_user(name, {"locked_until": now + lockout})
            else:
                self._unknown[name] = (failures, now + lockout)
            raise AccountLocked(max(1, math.ceil(lockout)), known=known)
        raise SignInRefused(known=known)

    def _unknown_failure(self, name: str) -> int:
        failures = self._unknown.pop(name, (0, 0.0))[0] + 1
        self._unknown[name] = (failures, 0.0)
        while len(self._unknown) > _MAX_UNKNOWN_NAMES:
            self._unknown.popitem(last=False)
        return failures

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
