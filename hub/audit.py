"""The operator audit log: an append-only, hash-chained record of every operator action.

Each entry records who acted (`actor`: the token's subject, or `local:<user>` for the CLI;
`token_id`: the token's `jti`), what they did (`action`: the API handler's name or the CLI
action, with `method` and `path`: the route template, or `CLI` and the command), on what
(`target`: the path parameters, or what the CLI acted on), how it ended (`status`: the HTTP
status, or null for a CLI action, recorded only once it succeeded), the request's
`correlation_id`, the `client` (the TCP peer of the request, never a forwarded header;
`local` for the CLI) and when (`ts`, epoch seconds). Request bodies and secrets are never
recorded.

The chain: entries are numbered 1, 2, 3... and each stores `prev_hash`, the `hash` of the
entry before it (64 zeros for the first), and its own
`hash = sha256(prev_hash || canonical JSON of its fields)`, where the fields are every member
above plus `id` (not the two hashes), rendered as JSON with sorted keys and no whitespace
(orjson). Changing any field of an entry, deleting or reordering entries breaks the chain at
that entry, which `verify` reports. The store appends an entry in the same write transaction
that reads the last one, so concurrent appenders (the hub and the CLI included) cannot fork it.

What a hash chain cannot show on its own: someone able to write the database may cut entries
off the end, or rewrite the chain from some entry on. `verify` prints the head hash; keep it
somewhere else (a ticket, the SIEM) to be able to tell later that the log still extends it.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.store import Page, Store

GENESIS = "0" * 64
VERIFY_BATCH = 1000
LOCAL_CLIENT = "local"
CLI_METHOD = "CLI"
# The fields an entry's hash covers, besides the previous hash: all but the two hashes.
_HASHED = ("id", "ts", "actor", "token_id", "action", "method", "path", "target", "status", "correlation_id",
           "client")  # fmt: skip


class AuditEntry(TypedDict):
    """One stored entry, as the API lists it."""

    id: int
    ts: float
    actor: str
    token_id: str | None
    action: str
    method: str
    path: str
    target: dict[str, str]
    status: int | None
    correlation_id: str | None
    client: str | None
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Action:
    """What to record: one operator action, before it is numbered and chained."""

    actor: str
    action: str
    method: str
    path: str
    target: Mapping[str, str] = field(default_factory=dict)
    status: int | None = None
    token_id: str | None = None
    correlation_id: str | None = None
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Break:
    """The first entry where the chain does not hold, and what is wrong with it."""

    entry_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of walking the chain: entries checked, the last hash, the first break."""

    count: int
    head: str
    broken: Break | None

    @property
    def intact(self) -> bool:
        return self.broken is None


def entry_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """Hash an entry's fields chained to `prev_hash` (see the module docstring)."""
    fields = {name: entry[name] for name in _HASHED}
    return hashlib.sha256(
        prev_hash.encode("ascii") + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def local_actor() -> str:
    """Name the person running the CLI: `local:<login>` (uid when the login is unknown)."""
    try:
        return f"local:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in the environment nor the password database
        return f"local:uid-{os.getuid()}"


def cli_action(action: str, command: str, target: Mapping[str, str]) -> Action:
    """Describe an operator action taken on this machine with the CLI `command`.

    `action` is the API operation id of the same action where there is one (`revoke_token`),
    so one filter finds it whichever way it was taken; `method` is `CLI`.
    """
    return Action(
        actor=local_actor(),
        action=action,
        method=CLI_METHOD,
        path=command,
        target=target,
        client=LOCAL_CLIENT,
    )


class AuditLog:
    """Append operator actions to the chained log, list them, and verify the chain."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def append(self, action: Action) -> AuditEntry:
        """Record `action` after the last entry; return the stored entry with its hashes."""

        # Runs inside the store's write transaction, after it read the last entry. The time is
        # read there too, so times follow the chain's order (barring a clock step).
        def link(last_id: int, last_hash: str | None) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "id": last_id + 1,
                "ts": self._clock(),
                "actor": action.actor,
                "token_id": action.token_id,
                "action": action.action,
                "method": action.method,
                "path": action.path,
                "target": dict(action.target),
                "status": action.status,
                "correlation_id": action.correlation_id,
                "client": action.client,
                "prev_hash": last_hash or GENESIS,
            }
            entry["hash"] = entry_hash(entry["prev_hash"], entry)
            return entry

        return cast(AuditEntry, await self._store.append_audit(link))

    async def page(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: list[Any] | None = None,
        limit: int,
    ) -> Page:
        """One page of entries, newest first, filtered."""
        return await self._store.list_audit(
            actor=actor, action=action, since=since, until=until, after=after, limit=limit
        )

    async def verify(self, *, progress: Callable[[int], None] | None = None) -> ChainReport:
        """Walk the chain from the first entry and report the first one that does not hold."""
        count, last_id, head = 0, 0, GENESIS
        while batch := await self._store.audit_entries(after_id=last_id, limit=VERIFY_BATCH):
            for entry in batch:
                broken = _check(entry, last_id, head)
                if broken is not None:
                    return ChainReport(count, head, broken)
                count, last_id, head = count + 1, entry["id"], entry["hash"]
            if progress is not None:
                progress(count)
        return ChainReport(count, head, None)


def _check(entry: Mapping[str, Any], last_id: int, last_hash: str) -> Break | None:
    entry_id = int(entry["id"])
    if entry_id != last_id + 1:
        missing = (
            f"entry {last_id + 1}" if entry_id == last_id + 2 else f"entries {last_id + 1}-{entry_id - 1}"
        )
        return Break(entry_id, f"{missing} missing: the ids jump from {last_id} to {entry_id}")
    if entry["prev_hash"] != last_hash:
        before = f"entry {last_id}" if last_id else "the chain's start (genesis)"
        return Break(entry_id, f"prev_hash does not match the hash of {before}")
    if entry_hash(last_hash, entry) != entry["hash"]:
        return Break(
            entry_id, "the entry's fields do not match its hash: it was altered after it was written"
        )
    return None
