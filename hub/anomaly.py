"""Agent anomaly detection: each agent's event rate and mix of kinds against its own rolling baseline.

Every `anomaly_interval_s` the events each agent sent in the interval are judged against an
exponentially weighted mean and variance of its past intervals (and a weighted share of each
event kind), once `anomaly_warmup_intervals` have been learned:

- a burst: far above the mean (z-score, a multiple of the mean and an absolute floor all agree);
- a silence: no events for `anomaly_silence_intervals` while the agent is connected, when its
  baseline says it normally sends many (heartbeats are not events);
- a kind-mix shift: a kind's share jumps far beyond its baseline share.

Each raises one alert per episode, stored, announced and pushed like every alert; the episode
ends, and the alert re-arms, when the interval looks normal again. With `anomaly_throttle` a
burst also throttles the agent (`Throttles`) until an operator lifts it through the API.
Baselines live in memory on the node the agent sends to; throttles live in the store, so they
survive a restart and every node enforces them (another node learns within an interval).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hub.config import Settings
from hub.limits import Decision, TokenBuckets
from hub.notices import alert_notices
from hub.scoring import alert_fingerprint
from hub.store import Store

log = logging.getLogger(__name__)
Anomaly = Literal["burst", "silence", "mix"]
_SEVERITY: dict[Anomaly, str] = {"burst": "HIGH", "silence": "MEDIUM", "mix": "MEDIUM"}
DETECTOR = "anomaly-detector"  # who throttled an agent automatically


class Throttles:
    """Agents held to a low event rate until an operator lifts it; the store holds the truth.

    Each throttled agent has a token bucket of its own rate; a new throttle starts with the
    bucket empty, so it bites at once. `burst` (a full batch) lets every batch pass eventually.
    """

    def __init__(self, store: Store, *, burst: int) -> None:
        self._store = store
        self._burst = burst
        self._buckets: dict[str, TokenBuckets] = {}
        self._changes = 0  # throttles set or lifted here: a load read before one is stale

    def take(self, agent_id: str, cost: int) -> Decision | None:
        """Spend `cost` of a throttled agent's tokens; None when the agent is not throttled."""
        bucket = self._buckets.get(agent_id)
        return None if bucket is None else bucket.take(agent_id, cost)

    def rate_of(self, agent_id: str) -> float | None:
        """The rate `agent_id` is held to, if it is throttled."""
        bucket = self._buckets.get(agent_id)
        return None if bucket is None else bucket.rate

    async def load(self) -> None:
        """Follow the store: throttles set or lifted by any node, or before a restart."""
        changes = self._changes
        records = await self._store.list_throttles()
        if changes != self._changes:
            return  # the next load sees what changed meanwhile
        rates = {record["agent_id"]: float(record["events_per_s"]) for record in records}
        for agent_id in set(self._buckets) - set(rates):
            del self._buckets[agent_id]
        for agent_id, rate in rates.items():
            self._hold(agent_id, rate)

    async def throttle(
        self, agent_id: str, *, events_per_s: float, reason: str, by: str, replace: bool = True
    ) -> dict[str, Any]:
        """Throttle `agent_id` (replacing a throttle in force only if `replace`); return the throttle."""
        record = {"agent_id": agent_id, "events_per_s": events_per_s, "reason": reason,
                  "throttled_at": time.time(), "throttled_by": by}  # fmt: skip
        stored = await self._store.set_throttle(record, replace=replace)
        self._changes += 1
        self._hold(agent_id, float(stored["events_per_s"]))
        return stored

    async def lift(self, agent_id: str) -> bool:
        """Lift `agent_id`'s throttle; say whether it had one."""
        lifted = await self._store.delete_throttle(agent_id)
        self._changes += 1
        self._buckets.pop(agent_id, None)
        return lifted

    def _hold(self, agent_id: str, rate: float) -> None:
        bucket = self._buckets.get(agent_id)
        if bucket is not None and bucket.rate == rate:
            return
        bucket = TokenBuckets(rate=rate, burst=self._burst, max_keys=1)
        bucket.take(agent_id, cost=self._burst)  # empty from the start: the throttle bites now
        self._buckets[agent_id] = bucket


@dataclass(slots=True)
class _Baseline:
    """One agent's learned rate and mix, the interval being counted, and its open episodes."""

    counted: Counter[str] = field(default_factory=Counter)  # kinds of the current interval
    mean: float = 0.0
    variance: float = 0.0
    shares: dict[str, float] = field(default_factory=dict)
    learned: int = 0  # intervals folded into the baseline
    quiet: int = 0  # consecutive intervals without events
    open: set[Anomaly] = field(default_factory=set)


class AnomalyDetector:
    """Learn each agent's baseline from committed batches; judge every interval against it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        throttles: Throttles,
        publish: Callable[[str, str, dict[str, Any]], None],
        *,
        connected: Callable[[str], bool],
        on_alert: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._throttles = throttles
        self._publish = publish
        self._connected = connected
        self._on_alert = on_alert
        self._alpha = 2.0 / (settings.anomaly_span_intervals + 1)
        self._agents: dict[str, _Baseline] = {}

    def record(self, agent_id: str, kinds: Counter[str]) -> None:
        """Count a committed batch's new events by kind."""
        baseline = self._agents.get(agent_id)
        if baseline is None:
            baseline = self._agents[agent_id] = _Baseline()
        baseline.counted.update(kinds)

    async def run(self) -> None:
        """Close an interval every `anomaly_interval_s`: judge it, raise alerts, follow throttles."""
        while True:
            await asyncio.sleep(self._settings.anomaly_interval_s)
            try:
                await self._throttles.load()
                await self.close_interval(time.time())
            except Exception:  # the next interval tries again; detection never stops the hub
                log.exception("anomaly detection failed for this interval")

    async def close_interval(self, now: float) -> None:
        """Judge the interval just ended for every agent, then fold it into their baselines."""
        raised: list[tuple[str, Anomaly, str]] = []
        for agent_id, baseline in self._agents.items():
            connected = self._connected(agent_id)
            counted, baseline.counted = baseline.counted, Counter()
            if not counted and not connected:
                continue  # an agent away is neither silent nor learning
            total = counted.total()
            baseline.quiet = 0 if total else baseline.quiet + 1
            if baseline.learned >= self._settings.anomaly_warmup_intervals:
                found = self._judge(baseline, counted, total, connected=connected)
                for anomaly, title in found.items():
                    if anomaly not in baseline.open:
                        raised.append((agent_id, anomaly, title))
                baseline.open = set(found)
            self._learn(baseline, counted, total)
        for agent_id, anomaly, title in raised:
            await self._raise(agent_id, anomaly, title, now)

    def _judge(
        self, baseline: _Baseline, counted: Counter[str], total: int, *, connected: bool
    ) -> dict[Anomaly, str]:
        settings = self._settings
        found: dict[Anomaly, str] = {}
        # Counts vary at least as a Poisson process would: steady traffic is not infinitely sure.
        spread = max(math.sqrt(baseline.variance), math.sqrt(max(baseline.mean, 1.0)))
        z = (total - baseline.mean) / spread
        if (
            z > settings.anomaly_z_threshold
            and total >= settings.anomaly_min_factor * baseline.mean
            and total >= settings.anomaly_min_events
        ):
            found["burst"] = (
                f"Event burst: {total} events in {settings.anomaly_interval_s:g} s "
                f"(baseline {baseline.mean:.1f}, z {z:.1f})"
            )
        if (
            connected
            and baseline.quiet >= settings.anomaly_silence_intervals
            and baseline.mean >= settings.anomaly_silence_min_mean
        ):
            silent_s = baseline.quiet * settings.anomaly_interval_s
            found["silence"] = (
                f"Silent for {silent_s:g} s while connected (baseline {baseline.mean:.1f} events)"
            )
        if total >= settings.anomaly_min_events:
            shifted = [
                (kind, count / total)
                for kind, count in counted.items()
                if count / total - baseline.shares.get(kind, 0.0) > settings.anomaly_mix_shift
            ]
            if shifted:
                kind, share = max(shifted, key=lambda item: item[1])
                usual = baseline.shares.get(kind, 0.0)
                found["mix"] = f"Kind mix shifted: {kind} is {share:.0%} of events (baseline {usual:.0%})"
        return found

    def _learn(self, baseline: _Baseline, counted: Counter[str], total: int) -> None:
        alpha = self._alpha
        if baseline.learned == 0:
            baseline.mean = float(total)
            baseline.shares = {kind: count / total for kind, count in counted.items()} if total else {}
        else:
            # Exponentially weighted mean and variance (West's incremental form).
            diff = total - baseline.mean
            baseline.mean += alpha * diff
            baseline.variance = (1 - alpha) * (baseline.variance + alpha * diff * diff)
            if total:
                for kind in baseline.shares.keys() | counted.keys():
                    share = counted.get(kind, 0) / total
                    baseline.shares[kind] = baseline.shares.get(kind, 0.0) + alpha * (
                        share - baseline.shares.get(kind, 0.0)
                    )
        baseline.learned += 1

    async def _raise(self, agent_id: str, anomaly: Anomaly, title: str, now: float) -> None:
        alert = {
            "agent_id": agent_id,
            "pid": 0,
            "process_id": f"{agent_id}:0",
            "process_key": f"{agent_id}:0:0",
            "severity": _SEVERITY[anomaly],
            "rule_id": f"anomaly-{anomaly}",
            "title": title,
            "mitre": [],
            "risk_score": 0.0,
            "threshold": None,
            "ts": now,
            "status": "open",
            "explanation": [],
            "tags": ["anomaly"],
            "fingerprint": alert_fingerprint(f"anomaly-{anomaly}", agent_id),
        }
        (stored,) = await self._store.insert_alerts(
            [alert], alert_notices, forward_to_siem=self._settings.siem_endpoint is not None,
            suppression_window_s=self._settings.alert_suppression_window_s,
        )  # fmt: skip
        if self._on_alert is not None and stored["count"] == 1:  # a repeat folded into an alert is no new one
            self._on_alert(stored["severity"])
        self._publish("alert", stored["id"], stored)
        log.warning("anomaly alert %s for agent %s: %s", stored["rule_id"], agent_id, title)
        if anomaly == "burst" and self._settings.anomaly_throttle:
            # An operator's throttle in force stays as they set it.
            await self._throttles.throttle(
                agent_id,
                events_per_s=self._settings.anomaly_throttle_events_per_s,
                reason=f"automatic, on alert {stored['id']}: {title}",
                by=DETECTOR,
                replace=False,
            )
