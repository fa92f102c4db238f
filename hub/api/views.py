"""What the API answers with: the response shapes its OpenAPI document describes."""

from __future__ import annotations

from typing import Literal, NotRequired, Required

from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.models import AgentStatus, Contribution, Event, Heartbeat, ScoreView, Severity

AlertStatus = Literal["open", "acknowledged", "resolved"]


class AgentView(TypedDict):
    agent_id: str
    status: AgentStatus
    status_reason: str | None
    status_changed_at: float | None
    connected_at: float | None
    last_seen: float | None
    hostname: str | None
    agent_version: str | None
    platform: str | None
    cert_fingerprint: str | None
    node: str | None  # the hub node the agent is (or was last) connected to
    heartbeat: Heartbeat | None
    risk: float


class HeartbeatPoint(TypedDict):
    """One stored heartbeat; `ts` is when the hub received it, the rest what the agent sent."""

    ts: float
    cpu_percent: float | None
    mem_percent: float | None
    disk_percent: float | None
    spool_depth: int | None
    dropped: int | None
    uptime_s: float | None


class StoredEvent(Event, total=False):
    """An event as stored: what the agent sent, plus who sent it and when it arrived."""

    agent_id: Required[str]
    received_at: Required[float]


class ProcessView(ScoreView):
    """A process with its score and the state scoring keeps for it."""

    comm: str | None
    inherited_from: str | None
    fired_thresholds: list[float]
    alerted_rules: list[str]


class ProcessNode(ProcessView):
    parent_key: str | None  # its parent among the tree's nodes; null for the topmost


class ProcessTree(TypedDict):
    process_key: str
    nodes: list[ProcessNode]


class AlertView(TypedDict):
    id: str
    agent_id: str
    pid: int
    process_id: str
    process_key: str
    severity: Severity
    rule_id: str
    title: str
    mitre: list[str]
    risk_score: float
    threshold: float | None
    ts: float
    status: AlertStatus
    explanation: list[Contribution]
    tags: list[str]  # the rule's tags; for a risk threshold, those of the rules explaining it
    fingerprint: str | None  # sha256 of rule, agent and process lineage; null on alerts from before it
    count: int  # times raised: repeats within the suppression window fold into the first
    last_seen_at: float  # the latest repeat's event time (`ts` is the first's)
    acknowledged_by: NotRequired[str]
    acknowledged_at: NotRequired[float]
    resolved_by: NotRequired[str]
    resolved_at: NotRequired[float]
    note: NotRequired[str | None]


class Health(TypedDict):
    status: Literal["ok"]
    version: str
    database: Literal["ok"]
    uptime_s: float
    agents_connected: int


class Stats(TypedDict):
    events_accepted: int
    events_duplicate: int
    events_rejected: int
    events_scored: int
    scoring_backlog: int
    agents_connected: int
    dashboards: int
    push_published: int
    push_coalesced: int
    push_resyncs: int
    push_cutoffs: int
