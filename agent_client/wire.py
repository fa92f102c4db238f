"""Shapes and constants of the agent side of PROTOCOL.md; no I/O here."""

from __future__ import annotations

from typing import Any, Final, Literal, TypeAlias

import msgpack
import orjson

from hub.models import EVENT_KINDS as _HUB_EVENT_KINDS

Event: TypeAlias = dict[str, Any]
"""One event as PROTOCOL.md describes it; `seq` is added by the spool."""

Encoding: TypeAlias = Literal["json", "msgpack"]

NAMESPACE: Final = "/agent"

EVENT_KINDS: Final = frozenset(_HUB_EVENT_KINDS)  # one list, the hub's

# A connect refusal with one of these codes will not heal by retrying.
FATAL_CONNECT_CODES: Final = frozenset({"cert_revoked", "cert_untrusted", "cn_invalid", "cert_expired"})

# The hub keeps nothing of a batch answered with these codes; the agent retries it.
# Error acks that resending the same batch cannot fix; every other error is retried.
PERMANENT_CODES: Final = frozenset({"invalid_input", "batch_too_large"})

# Hub defaults (PROTOCOL.md): 1,000 events and 1 MiB per batch; stay under the byte limit
# with room for the Socket.IO framing and for JSON escaping that orjson does not do.
DEFAULT_MAX_BATCH: Final = 1000
DEFAULT_MAX_BATCH_BYTES: Final = 768 * 1024


def encode_batch(events: list[Event], encoding: Encoding) -> dict[str, Any] | bytes:
    """Return the `events` payload: the object itself for JSON, msgpack bytes otherwise."""
    payload = {"events": events}
    if encoding == "msgpack":
        packed: bytes = msgpack.packb(payload, use_bin_type=True)
        return packed
    return payload


def event_size(event: Event) -> int:
    """Estimate an event's encoded size in bytes."""
    return len(orjson.dumps(event)) + 1


class HubRefusalError(Exception):
    """The hub refused this agent for good (revoked, or a connect error that retrying won't fix)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
