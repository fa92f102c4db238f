"""The one ingest path: validate, dedupe by (agent_id, seq), group-commit, ack, hand to scoring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgpack
from pydantic import ValidationError

from hub.anomaly import AnomalyDetector, Throttles
from hub.codec import decode_batch, nested_deeper_than
from hub.config import Settings
from hub.limits import TokenBuckets
from hub.models import EVENT_ADAPTER, EVENT_BATCH_ADAPTER, BatchAck, Event, Rejection
from hub.problems import Overloaded, Unavailable
from hub.scoring import ScoringService
from hub.store import EventBatch, Store

log = logging.getLogger(__name__)
_CLOSE_WAIT_S = 10.0  # longest shutdown waits for batches under way


class Ingestor:
    """Turn an `events` payload into stored events and the ack PROTOCOL.md promises."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        scoring: ScoringService,
        *,
        throttles: Throttles,
        anomalies: AnomalyDetector,
    ) -> None:
        self._settings = settings
        self._store = store
        self._scoring = scoring
        self.throttles = throttles
        self._anomalies = anomalies
        self._last_seq: dict[str, int] = {}
        self._quotas = TokenBuckets(rate=settings.agent_max_events_per_s, burst=settings.agent_burst_events)
        # Stored bodies are msgpack: a reused Packer costs a sixth of a per-call orjson.dumps.
        self._packer = msgpack.Packer()
        self.in_flight = 0  # events taken in and not yet acked
        self._closing = False
        self._paused: str | None = None  # why new batches are refused for now
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0

    async def last_seq(self, agent_id: str) -> int:
        """Return the highest stored seq of `agent_id` (cached after the first look-up)."""
        if agent_id not in self._last_seq:
            self._last_seq[agent_id] = await self._store.last_seq(agent_id)
        return self._last_seq[agent_id]

    async def scored(self) -> None:
        """Wait until every event taken in is scored and its scores stored (never raises)."""
        try:
            await self._scoring.drain()
        except Exception as exc:  # the store failed: the node the agents move to scores on without it
            log.warning("scoring what was taken in failed before the agents left: %s", exc)

    async def resume(self, agent_id: str) -> int:
        """Start an agent's session: return its last stored seq, and score on from its stored state.

        Both are read from the store again: with several nodes, the agent may have streamed to
        another one since this node last saw it.
        """
        self._scoring.reload(agent_id)
        stored = await self._store.last_seq(agent_id)
        # A batch of the agent's previous socket may still be committing here: keep the higher.
        self._last_seq[agent_id] = max(stored, self._last_seq.get(agent_id, 0))
        return self._last_seq[agent_id]

    async def ingest(self, agent_id: str, payload: Any) -> BatchAck:
        """Store a batch durably and return its ack; raise `HubError` for a bad or untimely one."""
        settings = self._settings
        raw = decode_batch(payload, max_events=settings.max_batch_events, max_bytes=settings.max_batch_bytes)
        if self._closing:
            raise Unavailable("the hub is shutting down", retry_after_ms=settings.retry_after_ms)
        if self._paused:
            raise Overloaded(self._paused, retry_after_ms=settings.retry_after_ms)
        if self.in_flight + self._scoring.backlog + len(raw) > settings.ingest_max_pending_events:
            raise Overloaded("the hub's ingest queue is full", retry_after_ms=settings.retry_after_ms)
        throttled = self.throttles.take(agent_id, cost=len(raw))
        if throttled is not None and not throttled.allowed:  # until an operator lifts it
            raise Overloaded(
                f"agent {agent_id} is throttled to {self.throttles.rate_of(agent_id):g} events/s",
                retry_after_ms=max(1, math.ceil(throttled.retry_after_s * 1000)),
            )
        quota = self._quotas.take(agent_id, cost=len(raw))
        if not quota.allowed:  # one agent flooding is throttled alone
            raise Overloaded(
                f"agent {agent_id} is over its quota of {settings.agent_max_events_per_s:g} events/s",
                retry_after_ms=max(1, math.ceil(quota.retry_after_s * 1000)),
            )
        # Counted from here: batches waiting for scoring hold memory too.
        self.in_flight += len(raw)
        self._idle.clear()
        try:
            return await self._commit(agent_id, raw)
        finally:
            self.in_flight -= len(raw)
            if not self.in_flight:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def paused(self, reason: str) -> AsyncIterator[None]:
        """Refuse new batches as overloaded (agents resend them) and wait for those under way."""
        self._paused = reason
        try:
            await self._idle.wait()
            yield
        finally:
            self._paused = None

    async def _commit(self, agent_id: str, raw: list[Any]) -> BatchAck:
        settings = self._settings
        if self._scoring.full:
            try:
                async with asyncio.timeout(settings.scoring_wait_s):  # no task a wait, as `wait_for` makes
                    await self._scoring.wait_for_room()
            except TimeoutError:
                raise Overloaded("scoring is behind", retry_after_ms=settings.retry_after_ms) from None
        events, bodies, rejected, to_score = self._validate(raw)
        await self.last_seq(agent_id)  # the stored high-water mark, read once per agent
        try:
            new_seqs = await self._store.commit_events(
                EventBatch(agent_id, events, bodies, received_at=time.time())
            )
        except BaseException:  # cancelled too: the commit may have happened
            # The batch may be stored all the same (a commit whose answer was lost): its resend
            # would be all duplicates, which are not scored. Scoring looks in the store instead.
            self._scoring.reload(agent_id)
            raise
        new_events = events
        if len(new_seqs) < len(events):  # some were stored before: those are neither scored nor counted
            new_events = [event for event in events if event["seq"] in new_seqs]
            to_score = [event for event in to_score if event["seq"] in new_seqs]
        if new_seqs:
            self._scoring.submit(agent_id, min(new_seqs), len(new_seqs), to_score)
            self._anomalies.record(agent_id, Counter(event["kind"] for event in new_events))
        # Another batch of this agent may have committed meanwhile: never move backwards.
        last = max([self._last_seq[agent_id], *(event["seq"] for event in events)])
        self._last_seq[agent_id] = last
        self.accepted += len(new_events)
        self.duplicates += len(events) - len(new_events)
        self.rejected += len(rejected)
        return BatchAck(
            accepted=len(new_events),
            duplicates=len(events) - len(new_events),
            rejected=rejected,
            last_seq=last,
        )

    async def close(self) -> None:
        """Refuse new batches (agents retry elsewhere or later) and wait for those under way."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await self._idle.wait()

    def _validate(self, raw: list[Any]) -> tuple[list[Event], list[bytes], list[Rejection], list[Event]]:
        """Return the batch's valid events, their stored bodies, the rejections, and those of the
        valid events that may change a score."""
        checked: list[Event] | None
        try:
            checked = list(EVENT_BATCH_ADAPTER.validate_python(raw))
        except ValidationError:
            checked = None
        # Unknown fields were dropped, not refused: an event that had any is shorter now.
        if checked is not None and sum(map(len, checked)) == sum(map(len, raw)):
            candidates, rejected = list(enumerate(checked)), list[Rejection]()
        else:  # which events are wrong, and why, one by one
            candidates, rejected = self._validate_each(raw)
        events: list[Event] = []
        bodies: list[bytes] = []
        # Picked out here, in the one pass over the batch: scoring then queues, counts and runs
        # through the rules only these (most batches hold one or none), not every event again.
        to_score: list[Event] = []
        may_change = self._scoring.engine.may_change
        limit = self._settings.max_event_bytes
        pack = self._packer.pack
        seen: set[int] = set()
        for index, event in candidates:
            seq = event["seq"]
            problem = self._check_metadata(event["metadata"]) if "metadata" in event else None
            if seq in seen:
                problem = f"seq {seq} appears twice in this batch"
            seen.add(seq)
            body = b""
            if problem is None:
                try:
                    body = pack(event)
                except (TypeError, ValueError, OverflowError):  # e.g. an integer wider than 64 bits
                    problem = "metadata holds a value that cannot be stored"
                else:
                    if len(body) > limit:
                        problem = f"the event is {len(body)} bytes; the limit is {limit} (max_event_bytes)"
            if problem is None:
                events.append(event)
                bodies.append(body)
                if may_change(event):
                    to_score.append(event)
            else:
                rejected.append(Rejection(index=index, seq=seq, error=problem))
        rejected.sort(key=lambda r: r["index"])
        return events, bodies, rejected, to_score

    def _validate_each(self, raw: list[Any]) -> tuple[list[tuple[int, Event]], list[Rejection]]:
        valid: list[tuple[int, Event]] = []
        rejected: list[Rejection] = []
        for index, item in enumerate(raw):
            try:
                valid.append((index, EVENT_ADAPTER.validate_python(item)))
            except ValidationError as exc:
                rejected.append(Rejection(index=index, seq=_raw_seq(item), error=_describe(exc)))
        return valid, rejected

    def _check_metadata(self, metadata: dict[str, Any]) -> str | None:
        if nested_deeper_than(metadata, self._settings.max_metadata_depth):
            return f"metadata is nested deeper than {self._settings.max_metadata_depth} levels"
        return None


def _raw_seq(item: Any) -> int | None:
    seq = item.get("seq") if isinstance(item, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:3]:
        if error["type"] == "recursion_depth_exceeded":  # absurd nesting, before the hub's own check
            where, message = str(error["loc"][0]), "nested deeper than the hub accepts"
        else:
            where, message = ".".join(str(part) for part in error["loc"]) or "event", error["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
