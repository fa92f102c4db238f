"""Token buckets: the one rate-limiting mechanism (API callers, addresses, agents' events)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until one request is allowed again


class TokenBuckets:
    """One bucket of `burst` tokens per key, refilled at `rate` tokens a second.

    Buckets live in this process: with several hub nodes each node enforces the limit on
    the requests it serves. The least recently used bucket goes first when `max_keys` is
    reached; a forgotten bucket is a full one, so forgetting never limits anyone.
    """

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, cost: int = 1, now: float | None = None) -> Decision:
        """Spend `cost` tokens of `key`'s bucket if it has them (all or nothing)."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)  # re-inserted last: the dict keeps LRU order
        if len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return Decision(
            allowed=allowed,
            remaining=math.floor(tokens),
            reset_s=(self.burst - tokens) / self.rate,
            retry_after_s=0.0 if allowed else (cost - tokens) / self.rate,
        )
