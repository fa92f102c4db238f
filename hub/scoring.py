"""The risk model (DESIGN.md) and the coroutine that applies it to every stored event.

`RiskEngine` is pure and deterministic: time is the events' own `ts`, never the wall
clock, so replaying stored events through it (`recalculate`) gives the scores live
scoring gave. `ScoringService` feeds it from the ingest queue, persists changed
processes, stores alerts and publishes both to dashboards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from hub.config import Settings
from hub.models import SEVERITY_ORDER, Contribution, Event, Publisher, ScoreView, score_view
from hub.notices import alert_notices, siem_event
from hub.rules import ProcessContext, Rule, RuleSet
from hub.store import ScoringState, Store

log = logging.getLogger(__name__)
INHERITED = "inherited"
_LIFECYCLE = frozenset({"process_start", "process_exit"})
_DIRECT_ALERT_SEVERITY = SEVERITY_ORDER["HIGH"]


@dataclass(frozen=True, slots=True)
class RiskParams:
    half_life_s: float
    k: float
    inherit_fraction: float
    thresholds: tuple[float, ...]
    hysteresis: float
    explanation_top: int
    max_processes: int = 50_000
    suppression_window_s: float = 0.0  # repeats of an unresolved alert seen this recently fold into it

    @classmethod
    def from_settings(cls, settings: Settings) -> RiskParams:
        return cls(
            half_life_s=settings.risk_half_life_s,
            k=settings.risk_k,
            inherit_fraction=settings.risk_inherit_fraction,
            thresholds=tuple(settings.risk_thresholds),
            hysteresis=settings.risk_hysteresis,
            explanation_top=settings.explanation_top,
            max_processes=settings.max_processes_per_agent,
            suppression_window_s=settings.alert_suppression_window_s,
        )


@dataclass(slots=True)
class ProcessRisk:
    """One process's risk: contributions per rule, decayed together to `updated_ts`."""

    agent_id: str
    pid: int
    start_ts: float
    ppid: int | None
    exe: str | None
    comm: str | None
    updated_ts: float
    contributions: dict[str, list[float]] = field(default_factory=dict)  # rule id -> [value, hits]
    inherited_from: str | None = None
    fired_thresholds: list[float] = field(default_factory=list)
    alerted_rules: list[str] = field(default_factory=list)
    risk_score: float = 0.0
    exited: bool = False
    stored: bool = False  # sent to the store once: its exit must reach the store too

    @property
    def process_key(self) -> str:
        return f"{self.agent_id}:{self.pid}:{self.start_ts:.6f}"

    @property
    def process_id(self) -> str:
        return f"{self.agent_id}:{self.pid}"

    def raw(self) -> float:
        return sum(value for value, _ in self.contributions.values())

    def decay_to(self, ts: float, half_life_s: float) -> None:
        if ts <= self.updated_ts:
            return
        factor = 0.5 ** ((ts - self.updated_ts) / half_life_s)
        for entry in self.contributions.values():
            entry[0] *= factor
        self.updated_ts = ts

    def to_record(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy dominated scoring passes.
        record = {name: getattr(self, name) for name in _RECORD_FIELDS}
        # Copies: a record waits for its commit while the next pass changes the process.
        record["contributions"] = {rule: list(entry) for rule, entry in self.contributions.items()}
        record["fired_thresholds"] = list(self.fired_thresholds)
        record["alerted_rules"] = list(self.alerted_rules)
        record["process_key"] = self.process_key
        record["process_id"] = self.process_id
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ProcessRisk:
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: record[name] for name in names if name in record})


_RECORD_FIELDS = tuple(ProcessRisk.__dataclass_fields__)
_LINEAGE_DEPTH = 16  # ancestors stored with a risky process, for the process tree around it


def _store(table: dict[int, ProcessRisk], process: ProcessRisk, changed: dict[str, ProcessRisk]) -> None:
    """Send `process` to the store, with its live ancestors not stored yet.

    Riskless processes are not stored (most never gain risk), but the tree around a risky one
    must show where it came from: a web server that spawned a shell scores nothing itself.
    """
    for _ in range(_LINEAGE_DEPTH + 1):
        changed[process.process_key] = process
        process.stored = True
        parent = table.get(process.ppid) if process.ppid is not None else None
        if parent is None or parent.stored:
            return
        process = parent


class RiskEngine:
    """Apply rules to events and keep every live process's risk; no I/O."""

    def __init__(self, rules: RuleSet, params: RiskParams) -> None:
        self.rules = rules
        self.params = params
        self._live: dict[str, dict[int, ProcessRisk]] = {}  # agent id -> pid -> process

    def knows(self, agent_id: str) -> bool:
        return agent_id in self._live

    def restore(self, agent_id: str, records: Iterable[dict[str, Any]]) -> None:
        """Load an agent's live processes from their stored records.

        What the store holds replaces what was kept here (another node may have scored or ended
        it since); riskless processes, which are never stored, stay as this node knew them.
        """
        table = self._live.setdefault(agent_id, {})
        for pid in [pid for pid, process in table.items() if process.stored]:
            del table[pid]
        for record in records:
            process = ProcessRisk.from_record(record)
            process.stored = True
            table[process.pid] = process

    def processes(self) -> Iterable[ProcessRisk]:
        for table in self._live.values():
            yield from table.values()

    def may_change(self, event: Event) -> bool:
        """Return False when scoring `event` changes nothing: no rule can match it, and it
        starts or ends no process (most events)."""
        return event["kind"] in _LIFECYCLE or self.rules.may_match(event)

    def apply(
        self,
        agent_id: str,
        event: Event,
        changed: dict[str, ProcessRisk],
        matches: list[tuple[str, Event, list[Rule]]] | None = None,
    ) -> list[dict[str, Any]]:
        """Score one event; put every process it changed into `changed`; return new alerts.

        When `matches` is given, an event that matched rules is added to it with them.
        """
        kind = event["kind"]
        possible = self.rules.may_match(event)
        if not possible and kind not in _LIFECYCLE:
            return []  # most events: no rule can match, and only starts and exits shape the tree
        table = self._live.setdefault(agent_id, {})
        if kind == "process_start":
            process = self._start(agent_id, table, event, changed)
        else:
            process = table.get(event["pid"]) or self._new_process(agent_id, table, event)
        matched = self.rules.match(event, self._context(table, process)) if possible else []
        alerts = self._add(process, matched, event["ts"]) if matched else []
        if matched:
            _store(table, process, changed)
            if matches is not None:
                matches.append((agent_id, event, matched))
        if kind == "process_exit":
            process.exited = True
            del table[process.pid]
            if process.stored:  # most processes never gain risk and are never stored
                changed[process.process_key] = process
        return alerts

    @staticmethod
    def _context(table: dict[int, ProcessRisk], process: ProcessRisk) -> ProcessContext:
        parent = table.get(process.ppid) if process.ppid is not None else None
        return ProcessContext(
            exe=process.exe,
            comm=process.comm,
            parent_exe=parent.exe if parent else None,
            parent_comm=parent.comm if parent else None,
        )

    def _start(
        self,
        agent_id: str,
        table: dict[int, ProcessRisk],
        event: Event,
        changed: dict[str, ProcessRisk],
    ) -> ProcessRisk:
        previous = table.get(event["pid"])
        if previous is not None:  # the pid was reused: the old process is gone
            previous.exited = True
            if previous.stored:
                changed[previous.process_key] = previous
        process = self._new_process(agent_id, table, event)
        parent = table.get(process.ppid) if process.ppid is not None else None
        if parent is not None and self.params.inherit_fraction > 0:
            parent.decay_to(event["ts"], self.params.half_life_s)
            inherited = parent.raw() * self.params.inherit_fraction
            if inherited > 0:
                process.contributions[INHERITED] = [inherited, 1]
                process.inherited_from = parent.process_id
                process.risk_score = self._score(process.raw())
                _store(table, process, changed)
        return process

    def _new_process(self, agent_id: str, table: dict[int, ProcessRisk], event: Event) -> ProcessRisk:
        # For a process we never saw start (it predates the agent) this keys it by first sight.
        if len(table) >= self.params.max_processes:
            _evict_one(table)
        process = ProcessRisk(
            agent_id=agent_id,
            pid=event["pid"],
            start_ts=event["ts"],
            ppid=event.get("ppid"),
            exe=event.get("exe"),
            comm=event.get("comm"),
            updated_ts=event["ts"],
        )
        table[process.pid] = process
        return process

    def _add(self, process: ProcessRisk, matched: list[Rule], ts: float) -> list[dict[str, Any]]:
        process.decay_to(ts, self.params.half_life_s)
        self._rearm(process, self._score(process.raw()))
        alerts = []
        for rule in matched:
            entry = process.contributions.setdefault(rule.id, [0.0, 0])
            entry[0] += rule.weight
            entry[1] += 1
            if (
                SEVERITY_ORDER[rule.severity] >= _DIRECT_ALERT_SEVERITY
                and rule.id not in process.alerted_rules
            ):
                process.alerted_rules.append(rule.id)
                alerts.append(self._alert(process, ts, rule=rule))
        process.risk_score = self._score(process.raw())
        alerts += self._crossings(process, ts)
        return alerts

    def _rearm(self, process: ProcessRisk, decayed_score: float) -> None:
        # Hysteresis: a fired threshold re-arms only once the score decayed well below it.
        process.fired_thresholds = [
            t for t in process.fired_thresholds if decayed_score >= t - self.params.hysteresis
        ]

    def _crossings(self, process: ProcessRisk, ts: float) -> list[dict[str, Any]]:
        crossed = [
            t for t in self.params.thresholds if process.risk_score >= t and t not in process.fired_thresholds
        ]
        process.fired_thresholds += crossed
        # One jump over several thresholds is one alert, for the highest.
        return [self._alert(process, ts, threshold=crossed[-1])] if crossed else []

    def _score(self, raw: float) -> float:
        return round(100.0 * (1.0 - math.exp(-raw / self.params.k)), 2)

    def explain(self, process: ProcessRisk) -> list[Contribution]:
        """Return the top contributing rules of `process`, largest first."""
        top = sorted(process.contributions.items(), key=lambda item: -item[1][0])
        explanation: list[Contribution] = []
        for rule_id, (value, hits) in top[: self.params.explanation_top]:
            rule = self.rules.get(rule_id)
            if rule is None:
                name = f"inherited from parent {process.inherited_from}" if rule_id == INHERITED else rule_id
                severity, mitre = "LOW", []
            else:
                name, severity, mitre = rule.name, rule.severity, rule.mitre
            explanation.append(
                Contribution(
                    rule_id=rule_id,
                    name=name,
                    severity=severity,
                    mitre=mitre,
                    contribution=round(value, 3),
                    hits=int(hits),
                )
            )
        return explanation

    def view(self, process: ProcessRisk) -> ScoreView:
        """Render a process for the API, the store and the dashboard."""
        return ScoreView(
            process_id=process.process_id,
            process_key=process.process_key,
            agent_id=process.agent_id,
            pid=process.pid,
            start_ts=process.start_ts,
            ppid=process.ppid,
            exe=process.exe,
            risk_score=process.risk_score,
            explanation=self.explain(process),
            updated_ts=process.updated_ts,
            exited=process.exited,
        )

    def record(self, process: ProcessRisk) -> dict[str, Any]:
        """Render a process for the store: its view plus the state to restore it."""
        return {**process.to_record(), **self.view(process)}

    def _alert(
        self, process: ProcessRisk, ts: float, *, rule: Rule | None = None, threshold: float | None = None
    ) -> dict[str, Any]:
        """Render an alert as it stands when raised: the score and explanation of that moment."""
        explanation = self.explain(process)
        if rule is not None:
            severity, rule_id, mitre, tags = rule.severity, rule.id, rule.mitre, sorted(rule.tags)
            title = f"{rule.name} ({process.exe or process.comm or f'pid {process.pid}'})"
        else:
            assert threshold is not None
            severity = "CRITICAL" if threshold >= max(self.params.thresholds) else "HIGH"
            rule_id = f"risk-threshold-{threshold:g}"
            mitre = sorted({m for line in explanation for m in line["mitre"]})
            tags = sorted({tag for line in explanation for tag in self._tags(line["rule_id"])})
            title = f"Risk of {process.process_id} crossed {threshold:g} ({process.risk_score:.1f})"
        return {
            "fingerprint": self._fingerprint(process, rule_id),
            "tags": tags,
            "agent_id": process.agent_id,
            "pid": process.pid,
            "process_id": process.process_id,
            "process_key": process.process_key,
            "severity": severity,
            "rule_id": rule_id,
            "title": title,
            "mitre": mitre,
            "risk_score": process.risk_score,
            "threshold": threshold,
            "ts": ts,
            "status": "open",
            "explanation": explanation,
        }

    def _tags(self, rule_id: str) -> tuple[str, ...]:
        rule = self.rules.get(rule_id)
        return rule.tags if rule is not None else ()

    def _fingerprint(self, process: ProcessRisk, rule_id: str) -> str:
        # The lineage is what ran, not which pid: the same chain replayed in new processes
        # (a web shell hit again) repeats one alert instead of raising a new one.
        parent = self._live.get(process.agent_id, {}).get(process.ppid) if process.ppid is not None else None
        lineage = (process.exe or process.comm, (parent.exe or parent.comm) if parent else None)
        return alert_fingerprint(rule_id, process.agent_id, lineage)


def alert_fingerprint(rule_id: str, agent_id: str, lineage: tuple[str | None, ...] = ()) -> str:
    """Name what an alert is about, so its repeats fold into it: the rule, the agent, what ran."""
    return hashlib.sha256(orjson.dumps([rule_id, agent_id, *lineage])).hexdigest()


def _evict_one(table: dict[int, ProcessRisk]) -> None:
    # Bounded memory per agent: forget the oldest process that carries no risk (dicts keep
    # insertion order), or the oldest of all when every one carries some.
    victim = next((pid for pid, process in table.items() if process.risk_score == 0), next(iter(table)))
    del table[victim]


# Events run through the rules per pass: a pass runs on the event loop, so a bound keeps acks flowing.
PASS_EVENTS = 2000
_RELOAD_COST = 20  # events a reload counts as: at most 100 agents' state read in one pass
_RETRY_S = 1.0


def _pass_size(work: Iterable[_Work]) -> int:
    """How many of `work`'s first items make one pass: `PASS_EVENTS` events, or a little more
    (each batch counts as one more, for its bookkeeping)."""
    count = taken = 0
    for item in work:
        if taken >= PASS_EVENTS:
            break
        count += 1
        taken += len(item.events) + 1 if item.count else _RELOAD_COST  # reloads read in portions
    return count


@dataclass(slots=True)
class _Work:
    """One stored batch, named by its first seq, or a reload (first seq and count 0)."""

    agent_id: str
    # To run through the rules: a live batch's events that may change a score; all of a batch
    # found pending in the store (`apply` passes over the rest).
    events: list[Event]
    first_seq: int
    count: int  # events the batch stored
    submitted: float = field(default_factory=time.monotonic)


class ScoringService:
    """Consume stored events in commit order, score them, persist and publish."""

    def __init__(
        self,
        engine: RiskEngine,
        store: Store,
        publish: Publisher,
        *,
        max_backlog: int,
        node_id: str = "",
        takeover_s: float = 30.0,
        on_lag: Callable[[float], None] | None = None,
        on_alert: Callable[[str], None] | None = None,
        siem_min_severity: str | None = None,
    ) -> None:
        self.engine = engine
        self._siem_min_severity = siem_min_severity  # None: SIEM forwarding is off, nothing queued
        self._store = store
        self._publish = publish
        self._max_backlog = max_backlog
        self._node_id = node_id
        self._takeover_s = takeover_s  # how long another node's pending batch is left to that node
        self._on_lag = on_lag  # told each batch's seconds from hand-over to scoring
        self._on_alert = on_alert  # told each new stored alert's severity (not the repeats folded)
        self._queue: deque[_Work] = deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._flushing: asyncio.Task[None] | None = None
        self._reload: set[str] = set()  # agents whose state is read from the store before their next events
        self._stopping = False
        self._pass = asyncio.Lock()  # one scoring pass at a time; drain() waits for it
        self.backlog = 0  # events queued to run through the rules
        self.scored = 0  # events of the batches scored, those no rule could concern included

    def reload(self, agent_id: str) -> None:
        """Read the agent's state from the store in the next pass (another node may have scored it
        since), and score its stored batches that are pending and not queued here."""
        if agent_id not in self._reload:  # else that pass is queued already
            self._reload.add(agent_id)
            self._queue.append(_Work(agent_id, [], 0, 0))  # it comes even if the agent sends nothing
            self._wakeup.set()

    def submit(self, agent_id: str, first_seq: int, count: int, events: list[Event]) -> None:
        """Hand over a newly stored batch (never blocks: it is committed): its first seq, how many
        events it stored, and those of them that may change a score (`RiskEngine.may_change`)."""
        self._queue.append(_Work(agent_id, events, first_seq, count))
        self.backlog += len(events)
        if self.backlog >= self._max_backlog:
            self._room.clear()
        self._wakeup.set()

    @property
    def full(self) -> bool:
        return self.backlog >= self._max_backlog

    async def wait_for_room(self) -> None:
        """Return once the backlog is below its bound: ingest's backpressure, so pushes stay live."""
        while self.backlog >= self._max_backlog:
            self._room.clear()
            await self._room.wait()

    async def run(self) -> None:
        """Score until `stop()`; each pass takes what is queued so pushes and writes batch up."""
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.drain()
            except Exception:  # the store failed: the work went back in the queue; retry
                log.exception("scoring pass failed; retrying in %.0f s", _RETRY_S)
                await asyncio.sleep(_RETRY_S)
                self._wakeup.set()

    def stop(self) -> None:
        """Ask `run()` to finish: it scores and persists what is queued, then returns."""
        self._stopping = True
        self._wakeup.set()

    async def watch_pending(self) -> None:
        """Reload the agents with a batch pending longer than `takeover_s` (its node stopped before
        scoring it, and the agent has not started a session since), every half of that; first those
        this node left pending when it last stopped. Run until cancelled."""
        node: str | None = self._node_id
        while True:
            try:
                for agent_id in await self._store.pending_agents(
                    before=time.time() - self._takeover_s, node=node
                ):
                    self.reload(agent_id)
                node = None
            except Exception as exc:  # the store failed: look again next time
                log.warning("looking for batches pending scoring failed: %s", exc)
            await asyncio.sleep(self._takeover_s / 2)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Score and persist what is queued, then hold scoring still (a recalculation runs)."""
        await self.drain()
        async with self._pass:
            if self._flushing is not None:  # a pass that came in between stores its scores first
                await self._flushing
            yield

    async def drain(self) -> None:
        """Score and persist everything queued, including a pass already under way."""
        while True:
            async with self._pass:
                if not self._queue:
                    if self._flushing is not None:
                        await self._flushing
                    return
                await self._score_pending()

    async def _score_pending(self) -> None:
        work = self._take()
        try:
            missed = await self._restore(work)
        except Exception:
            self._queue.extendleft(reversed(work))  # nothing was scored: try the same work again
            raise
        if missed:  # scored first, and in passes of the usual size: a crash under load leaves many
            work = [*missed, *work]
            size = _pass_size(work)
            self._queue.extendleft(reversed(work[size:]))  # all for agents restored now
            work = work[:size]
        changed: dict[str, ProcessRisk] = {}
        alerts: list[dict[str, Any]] = []
        matches: list[tuple[str, Event, list[Rule]]] | None = None if self._siem_min_severity is None else []
        scored: list[tuple[str, int]] = []  # the batches no longer pending once this pass is stored
        for item in work:
            if not item.count:  # a reload: `_restore` has read the agent's state
                continue
            if self._on_lag is not None:
                self._on_lag(time.monotonic() - item.submitted)
            for event in item.events:
                try:
                    alerts += self.engine.apply(item.agent_id, event, changed, matches)
                except Exception:  # a bug must cost one event's score, not the scorer
                    log.exception("scoring failed for %s seq %s", item.agent_id, event.get("seq"))
            scored.append((item.agent_id, item.first_seq))
            self.backlog -= len(item.events)
            self.scored += item.count
        if self.backlog < self._max_backlog:
            self._room.set()
        records = [self.engine.record(p) for p in changed.values()]
        forwarded = self._siem_events(matches)
        # One flush in flight: this pass's writes commit while the next pass scores, so
        # scoring does not stand still for every fsync, and flushes stay in order.
        if self._flushing is not None:
            await self._flushing
        self._flushing = asyncio.create_task(self._flush(records, alerts, forwarded, scored))

    def _take(self) -> list[_Work]:
        """The next pass's work, from the head of the queue."""
        return [self._queue.popleft() for _ in range(_pass_size(self._queue))]

    async def _restore(self, work: list[_Work]) -> list[_Work]:
        """Load the stored state of the pass's agents this node does not know (or must reload);
        return, to be scored first, their pending batches that nothing here is going to score."""
        reload, engine = self._reload, self.engine
        stale = {item.agent_id for item in work if item.agent_id in reload or not engine.knows(item.agent_id)}
        if not stale:
            return []
        if self._flushing is not None:
            await self._flushing  # what this node scored is stored before it is read back
        self._reload -= stale  # a reload asked for from here on gets a pass of its own
        try:
            states = await self._store.scoring_states(stale)
            missed = self._missed(states, work)
            for agent_id, state in states.items():
                self.engine.restore(agent_id, state.processes)
        except Exception:
            self._reload |= stale
            raise
        if missed:
            count = sum(len(item.events) for item in missed)
            log.warning("scoring %d stored events that were never scored (%d batches)", count, len(missed))
            self.backlog += count
        return missed

    def _missed(self, states: dict[str, ScoringState], work: list[_Work]) -> list[_Work]:
        # Every batch this node committed before the read is queued by now (Store.scoring_states):
        # those are scored in their turn. Another node's recent one may be in its queue still:
        # left to it for `takeover_s` (then `watch_pending` comes back for it).
        queued = {(item.agent_id, item.first_seq) for item in (*work, *self._queue)}
        taken_over_from = time.time() - self._takeover_s
        return [
            _Work(agent_id, batch.events, batch.first_seq, len(batch.events))
            for agent_id, state in states.items()
            for batch in state.pending
            if (agent_id, batch.first_seq) not in queued
            and (batch.node == self._node_id or batch.committed_at < taken_over_from)
        ]

    def _siem_events(self, matches: list[tuple[str, Event, list[Rule]]] | None) -> list[dict[str, Any]]:
        least = self._siem_min_severity
        if matches is None or least is None:
            return []
        bodies = (siem_event(agent_id, event, rules, least) for agent_id, event, rules in matches)
        return [body for body in bodies if body is not None]

    async def _flush(
        self,
        records: list[dict[str, Any]],
        alerts: list[dict[str, Any]],
        forwarded: list[dict[str, Any]],
        scored: list[tuple[str, int]],
    ) -> None:
        # Persist before publishing so a dashboard never shows what a restart would forget;
        # the state is already in memory, so a failing store is retried until it takes it.
        while True:
            try:
                # One transaction: the processes' states, their alerts, and the webhook deliveries
                # and SIEM rows announcing them. No committed alert goes unannounced, and no
                # process keeps a fired threshold whose alert a crash lost.
                stored_alerts = await self._store.insert_alerts(
                    alerts, alert_notices, processes=records,
                    forward_to_siem=self._siem_min_severity is not None, siem_events=forwarded,
                    suppression_window_s=self.engine.params.suppression_window_s, scored=scored,
                )  # fmt: skip
                break
            except Exception:
                if self._stopping:  # a stop must not wait for a store that does not answer
                    log.exception(
                        "persisting the scores of %d processes failed while stopping; they are lost "
                        "(the events are stored: `agenthub recalculate` scores them again)",
                        len(records),
                    )
                    return
                log.exception("persisting scores failed; retrying in %.0f s", _RETRY_S)
                await asyncio.sleep(_RETRY_S)
        for record in records:
            self._publish("score", record["process_key"], dict(score_view(record)))
        for alert in stored_alerts:
            if self._on_alert is not None and alert["count"] == 1:  # a repeat folded is no new alert
                self._on_alert(alert["severity"])
            self._publish("alert", alert["id"], alert)  # a fold: the alert it repeats, updated


async def recalculate(
    store: Store,
    engine: RiskEngine,
    *,
    page: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Replay every stored event through a fresh `engine` and replace the stored scores; return the count.

    Alerts the replay would raise are not raised again: those of the live run stay as they were.
    """
    changed: dict[str, ProcessRisk] = {}
    after: tuple[str, int] | None = None
    count, started = 0, time.time()
    while rows := await store.replay_events(after, page):
        for agent_id, event in rows:
            engine.apply(agent_id, event, changed)
        count += len(rows)
        after = (rows[-1][0], rows[-1][1]["seq"])
        if progress:
            progress(count)
    await store.replace_scores([engine.record(p) for p in changed.values()], replayed_from=started)
    return count
