"""Agent request signatures: HMAC-SHA256 for agents that post events over HTTP.

An agent that cannot hold a socket signs each request with its own secret (issued by an
operator, `POST /api/v1/agents/{agent_id}/signing-secret`):

    X-Agent-ID:        the agent id
    X-Agent-Timestamp: the send time, epoch seconds
    X-Agent-Signature: hex HMAC-SHA256(secret, timestamp_header_bytes + body_bytes)

A timestamp further than `hmac_max_skew_s` from the hub's clock is refused, and so is a
signature seen before within that window: a captured request cannot be replayed, and a
retry is signed anew. Every refusal is the same 401, so it tells nobody which agents exist.
Signatures are remembered by this process: a restart, or another node, would accept one
replay of a request from the last few minutes, which dedupe by `(agent_id, seq)` makes
harmless to the stored events.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from aiohttp import web

from hub.api.bodies import read_body
from hub.models import AGENT_ID_PATTERN
from hub.problems import Unauthorized
from hub.store import Store

AGENT_SIGNATURE = "agent:signature"  # the "scope" of routes agents call with signed requests
SIGNED_AGENT = web.RequestKey("signed_agent", str)  # the agent id a verified signature names
_AGENT_ID = re.compile(AGENT_ID_PATTERN)
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_MAX_REMEMBERED = 1_000_000  # signatures kept against replays (about 150 MB at most)


class SignatureVerifier:
    """Check signed agent requests against the agents' secrets, remembering recent signatures."""

    def __init__(self, store: Store, *, max_skew_s: float) -> None:
        self._store = store
        self._max_skew_s = max_skew_s
        self._seen: dict[str, float] = {}  # signature -> when it stops mattering

    async def verify(self, request: web.Request) -> str:
        """Return the agent id of a correctly signed, fresh request; raise `Unauthorized`."""
        agent_id = request.headers.get("X-Agent-ID", "")
        stamp = request.headers.get("X-Agent-Timestamp", "")
        signature = request.headers.get("X-Agent-Signature", "").lower()
        if not _AGENT_ID.match(agent_id) or not _SIGNATURE.match(signature):
            raise Unauthorized(
                "X-Agent-ID, X-Agent-Timestamp and X-Agent-Signature (64 hex digits) are required"
            )
        try:
            sent_at = float(stamp)
        except ValueError:
            raise Unauthorized("X-Agent-Timestamp must be epoch seconds") from None
        now = time.time()
        if not abs(now - sent_at) <= self._max_skew_s:
            raise Unauthorized(
                f"X-Agent-Timestamp is {now - sent_at:+.0f} s from the hub's clock; the limit is "
                f"{self._max_skew_s:g} s (check the agent's clock, and sign each request when sending it)"
            )
        secret = await self._store.get_agent_secret(agent_id)
        body = await read_body(request)
        expected = hmac.new((secret or "").encode(), stamp.encode() + body, hashlib.sha256).hexdigest()
        # Compared even without a secret, so timing does not tell which agents have one.
        if not hmac.compare_digest(expected, signature) or secret is None:
            raise Unauthorized("the signature does not match this agent's secret and this body")
        self._remember(signature, now)
        return agent_id

    def _remember(self, signature: str, now: float) -> None:
        # Entries are added in time order, so the expired ones are at the front.
        while self._seen and next(iter(self._seen.values())) < now:
            del self._seen[next(iter(self._seen))]
        if signature in self._seen:
            raise Unauthorized("this signed request was received before; sign each request anew")
        self._seen[signature] = now + 2 * self._max_skew_s
        if len(self._seen) > _MAX_REMEMBERED:  # bounded: the oldest are the nearest to stale anyway
            del self._seen[next(iter(self._seen))]


SIGNATURES = web.AppKey("signatures", SignatureVerifier)
