"""Durable state: one interface, backends chosen by configuration (SQLite is the embedded default)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol

from hub.models import Event

if TYPE_CHECKING:
    from hub.config import Settings


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Validated events of one agent, each already encoded for storage (msgpack); no seq twice."""

    agent_id: str
    events: list[Event]
    bodies: list[bytes]
    received_at: float


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A stored batch whose scores are not stored yet: `first_seq` names it, `node` stored it."""

    first_seq: int
    node: str
    committed_at: float
    events: list[Event]


@dataclass(frozen=True, slots=True)
class ScoringState:
    """What scoring resumes an agent from: its stored live processes, and its pending batches."""

    processes: list[dict[str, Any]]
    pending: list[PendingBatch]


@dataclass(frozen=True, slots=True)
class Notice:
    """Something webhooks may be told: every enabled subscription to `event_type` gets a delivery.

    `body` is the JSON object sent, to which each delivery adds its own `delivery_id`. The rest
    routes it: `severity`, `rule_id` and `tags` (alerts only) are checked against a subscription's
    `min_severity`, `severities`, `rule_ids` and `tags`; `agent_id` against its `agent_groups`.
    `first_attempt_at`: not sent before then (None: at once). `handover_of`: an agent a stopping
    node sent away; the notice is withdrawn if the agent connects again before it is sent.
    """

    event_type: str
    body: dict[str, Any]
    severity: str | None = None
    agent_id: str | None = None
    rule_id: str | None = None
    tags: tuple[str, ...] = ()
    first_attempt_at: float | None = None
    handover_of: str | None = None

    def routed(self, routes: Mapping[str, list[str]], agent_groups: Mapping[str, list[str]]) -> bool:
        """Say whether a subscription with these `routes` receives it; every filter given must match."""
        if self.severity is not None:  # the alert filters pass what is not an alert
            if (rule_ids := routes.get("rule_ids")) and self.rule_id not in rule_ids:
                return False
            if (severities := routes.get("severities")) and self.severity not in severities:
                return False
            if (tags := routes.get("tags")) and not set(tags) & set(self.tags):
                return False
        if groups := routes.get("agent_groups"):
            patterns = [pattern for group in groups for pattern in agent_groups.get(group, ())]
            return self.agent_id is not None and any(fnmatchcase(self.agent_id, p) for p in patterns)
        return True


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list, and the sort key of its last item when more follow."""

    items: list[dict[str, Any]]
    next_key: list[Any] | None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Conditions of an events query; each is optional."""

    agent_id: str | None = None
    kind: str | None = None
    pid: int | None = None
    since: float | None = None
    until: float | None = None

    def conditions(self) -> list[tuple[str, str, Any]]:
        """(column, operator, value) for every condition set; column names come from code only."""
        pairs = [("agent_id", "=", self.agent_id), ("kind", "=", self.kind), ("pid", "=", self.pid),
                 ("ts", ">=", self.since), ("ts", "<", self.until)]  # fmt: skip
        return [(column, operator, value) for column, operator, value in pairs if value is not None]


class Store(Protocol):
    """What the hub needs from durable storage."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def commit_events(self, batch: EventBatch) -> set[int]:
        """Store `batch` durably; return the seqs that were new (the rest were duplicates).

        The new ones are recorded as a batch pending scoring, in the same transaction.

        Raise `Unavailable` when another node stores some of the same events at the same moment
        (the agent resends the batch, and then they are duplicates).
        """
        ...

    async def last_seq(self, agent_id: str) -> int: ...
    async def count_events(self, agent_id: str | None = None) -> int: ...
    async def list_events(self, filters: EventFilter, *, after: list[Any] | None, limit: int) -> Page: ...
    async def replay_events(self, after: tuple[str, int] | None, limit: int) -> list[tuple[str, Event]]:
        """Return stored events in (agent_id, seq) order after the given key."""
        ...

    async def save_agent(
        self,
        agent_id: str,
        fields: dict[str, Any],
        notices: list[Notice] | None = None,
        *,
        connection: tuple[str, float] | None = None,
        returning_within_s: float | None = None,
    ) -> bool:
        """Upsert an agent's `fields`; a `heartbeat` among them also joins its history at `last_seen`.

        `notices` are queued for webhooks in the same transaction. With `connection` (node,
        connected_at), an existing agent is changed only while that is its stored connection;
        say whether it was saved. With `returning_within_s` (a connect): if a stopping node sent
        the agent away less than that long ago and its `handover_of` notices are all unsent,
        those are withdrawn and `notices` are not queued: webhooks hear of neither.
        """
        ...

    async def get_agent(self, agent_id: str) -> dict[str, Any] | None: ...
    async def list_agents(
        self, *, status: str | None, risk_min: float = 0.0, after: list[Any] | None, limit: int
    ) -> Page: ...
    async def agents_by_attention(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` agents a dashboard shows first: offline, then late, then online; riskiest first."""
        ...

    async def count_agents(self) -> dict[str, int]:
        """How many agents are in each status (online, late, offline)."""
        ...

    async def mark_node_offline(self, node: str, reason: str, now: float) -> None:
        """Mark offline every agent `node` (or no node) last held: that node is just starting."""

    async def claim_node(
        self, lease: dict[str, Any], *, replacing: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Hold `lease["node_id"]` for `lease` (node_id, instance, host, pid, renewed_at, lease_s).

        Taken when it is free, held by `lease["instance"]` already (a renewal), or held exactly
        as `replacing` says (a holder seen dead). Otherwise nothing changes and the holder's
        lease is returned.
        """
        ...

    async def release_node(self, node_id: str, instance: str) -> None:
        """Give up `node_id` if `instance` holds it."""

    async def clock(self) -> float | None:
        """The store's own time (epoch seconds), or None where it is this machine's (SQLite)."""

    async def save_heartbeat(
        self,
        agent_id: str,
        beat: dict[str, Any],
        *,
        now: float,
        connection: tuple[str, float],
        notices: list[Notice],
    ) -> bool:
        """Store a heartbeat of `connection` (node, connected_at), with its history row.

        An agent stored offline meanwhile (its node could not reach the store, and another
        node swept it) is online again, with `notices` queued: say whether it was. Nothing is
        stored when another connection holds the agent now.
        """

    async def mark_silent_offline(
        self, *, before: float, now: float, notices: Callable[[str], list[Notice]]
    ) -> list[str]:
        """Mark offline every agent still online or late last seen before `before`; return them.

        `notices` announce each. Such an agent's node stopped without saying so; any node may find it.
        """

    async def list_heartbeats(
        self, agent_id: str, *, since: float | None, until: float | None, after: list[Any] | None, limit: int
    ) -> Page:
        """An agent's heartbeat history by receive time, oldest first; `since` inclusive, `until` not."""
        ...

    async def prune_heartbeats(self, before: float) -> int:
        """Delete the heartbeats received before `before`; return how many."""
        ...

    async def scoring_states(self, agent_ids: Collection[str]) -> dict[str, ScoringState]:
        """Read what scoring resumes each agent from.

        Read after every commit queued before it has been answered: each pending batch this node
        stored has been handed to scoring by then, or never will be.
        """
        ...

    async def replace_scores(self, states: list[dict[str, Any]], *, replayed_from: float) -> None:
        """Replace every stored process state; the batches stored before `replayed_from` (when the
        replay that produced them began) are pending no more."""
        ...

    async def pending_agents(self, *, before: float, node: str | None = None) -> list[str]:
        """The agents with a batch pending scoring since before `before`, or stored by `node`."""
        ...

    async def list_scores(
        self,
        *,
        risk_min: float,
        agent_id: str | None,
        after: list[Any] | None,
        limit: int,
        live_only: bool = False,
    ) -> Page: ...
    async def list_processes(
        self, *, risk_min: float, agent_id: str | None, live: bool | None, after: list[Any] | None, limit: int
    ) -> Page: ...
    async def get_process(self, process_key: str) -> dict[str, Any] | None: ...
    async def process_tree(
        self, process_key: str, *, ancestors: int, descendants: int, limit: int
    ) -> list[dict[str, Any]] | None:
        """A process with its `parent_key`, its ancestors (topmost first) and descendants (level by level).

        Up to `ancestors` levels up and `descendants` down, `limit` processes in all, read at one
        moment; each parent is the newest process of the agent with the child's ppid that started
        no later than the child. None for an unknown process.
        """
        ...

    async def insert_alerts(
        self,
        alerts: list[dict[str, Any]],
        notices: Callable[[dict[str, Any]], list[Notice]] | None = None,
        *,
        processes: list[dict[str, Any]] | None = None,
        forward_to_siem: bool = False,
        siem_events: list[dict[str, Any]] | None = None,
        suppression_window_s: float = 0.0,
        scored: list[tuple[str, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Store new alerts, in one transaction with what announces them; return them with their ids.

        An alert whose `fingerprint` matches an unresolved alert last seen (event time) within
        `suppression_window_s` folds into it: that alert's `count`, `last_seen_at` and
        `risk_score` move on, and it is returned in the new one's place (its `count` above 1).
        `notices(alert)`, given each new alert with its id, are queued for webhooks, and with
        `forward_to_siem` the alert for the SIEM, with `siem_events`; a fold announces nothing.
        A scoring pass passes its changed `processes` too: a crash cannot keep a process's state
        (its fired thresholds) and lose the alert it raised, and the batches it `scored` ((agent id,
        first seq) pairs), which are pending no more.
        """
        ...

    async def list_alerts(
        self,
        *,
        agent_id: str | None,
        severity: str | None,
        status: str | None = None,
        fingerprint: str | None = None,
        after: list[Any] | None,
        limit: int,
    ) -> Page: ...
    async def get_alert(self, alert_id: int) -> dict[str, Any] | None: ...
    async def set_alert_status(
        self, alert_id: int, status: str, change: dict[str, Any], *, allowed_from: tuple[str, ...]
    ) -> dict[str, Any] | None:
        """Move an alert to `status` with `change` if its status is in `allowed_from`; return it then."""
        ...

    async def get_agent_secret(self, agent_id: str) -> str | None: ...
    async def set_agent_secret(self, agent_id: str, secret: str | None) -> bool:
        """Set (or with None, delete) an agent's signing secret; say whether anything changed."""
        ...

    async def get_idempotent(self, owner: str, key: str, now: float) -> dict[str, Any] | None:
        """The stored answer to `owner`'s request with Idempotency-Key `key`, unless expired."""
        ...

    async def save_idempotent(
        self, owner: str, key: str, answer: dict[str, Any], expires_at: float
    ) -> None: ...

    async def is_revoked(self, fingerprint: str) -> bool: ...
    async def revocations_since(self, after: float) -> list[dict[str, Any]]:
        """Revocations made after `after` (epoch s), oldest first: fingerprint, reason, revoked_at."""
        ...

    async def revoke(
        self,
        fingerprint: str,
        *,
        serial: str,
        agent_id: str,
        reason: str,
        notices: list[Notice] | None = None,
    ) -> bool:
        """Record a revocation unless there is one; `notices` are queued with a new one. Say whether new."""
        ...

    # audit log and operator token revocation -------------------------------------------

    async def append_audit(self, link: Callable[[int, str | None], dict[str, Any]]) -> dict[str, Any]:
        """Store the entry `link(last_id, last_hash)` builds (0, None when empty), in one transaction.

        Reading the last entry and inserting the new one must be one write transaction, so
        concurrent appenders, other processes included, cannot fork the chain.
        """
        ...

    async def audit_entries(self, *, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Entries with an id above `after_id`, in id (chain) order."""
        ...

    async def list_audit(
        self,
        *,
        actor: str | None,
        action: str | None,
        since: float | None,
        until: float | None,
        after: list[Any] | None,
        limit: int,
    ) -> Page:
        """Entries newest first (by id), filtered; `since` inclusive, `until` exclusive."""
        ...

    async def revoke_token(self, jti: str, *, reason: str, revoked_at: float) -> dict[str, Any]:
        """Record that token `jti` is revoked; return the record (the first one if it already was)."""
        ...

    async def get_revoked_token(self, jti: str) -> dict[str, Any] | None: ...

    # agent certificates
    async def save_certificate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Record a certificate unless its fingerprint is known; return the stored record.

        Saving a known certificate as "uploaded" marks it uploaded: trusted by fingerprint.
        """
        ...

    async def get_certificate(self, fingerprint: str) -> dict[str, Any] | None: ...
    async def list_certificates(
        self, *, agent_id: str | None, status: str | None, now: float, after: list[Any] | None, limit: int
    ) -> Page:
        """Certificates soonest to expire first; `status` is valid, expired or revoked."""
        ...

    async def uploaded_certificates(self, now: float) -> list[str]:
        """The PEM of every uploaded certificate not expired at `now`."""
        ...

    async def notify_expiring_certificates(
        self, *, now: float, until: float, notice: Callable[[dict[str, Any]], Notice]
    ) -> int:
        """Queue `notice(record)` once per unrevoked certificate expiring in (now, until]; return how many."""
        ...

    # commands

    async def insert_command(self, command: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store `command` unless its id exists; return the stored command and whether it is new."""
        ...

    async def get_command(self, command_id: str) -> dict[str, Any] | None: ...
    async def list_commands(
        self, agent_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        """An agent's commands, newest first, optionally in one state."""
        ...

    async def queued_commands(self, agent_id: str, now: float) -> list[dict[str, Any]]:
        """An agent's queued commands not expired at `now`, oldest first."""
        ...

    async def transition_command(
        self,
        command_id: str,
        *,
        expect: tuple[str, ...],
        changes: dict[str, Any],
        via: tuple[str, float] | None = None,
    ) -> dict[str, Any] | None:
        """Apply `changes` if the command's state is in `expect`; return it changed, else None.

        `via`: a connection (node, connected_at); only while it is the command's agent's stored one.
        """
        ...

    async def expire_commands(self, now: float, errors: dict[str, str]) -> list[dict[str, Any]]:
        """Expire queued and delivered commands due by `now`, recording `errors[old state]`; return them."""
        ...

    # webhooks

    async def insert_webhook(self, record: dict[str, Any], *, max_count: int) -> bool:
        """Store a new subscription unless `max_count` exist already; say whether it was stored."""
        ...

    async def get_webhook(self, webhook_id: str) -> dict[str, Any] | None:
        """A subscription with its secrets (the API never shows them: deliveries sign with them)."""
        ...

    async def list_webhooks(self, *, after: list[Any] | None, limit: int) -> Page:
        """Subscriptions in creation order."""
        ...

    async def update_webhook(
        self, webhook_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Apply the columns `change(current)` returns, in one write transaction; return the result.

        `change` may raise to refuse the change; None when there is no such subscription.
        """
        ...

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Delete a subscription and its deliveries."""
        ...

    # webhook deliveries (the outbox)

    async def enqueue_delivery(self, webhook_id: str, notice: Notice, now: float) -> dict[str, Any] | None:
        """Queue `notice` for one subscription whatever it subscribes to; None when there is none."""
        ...

    async def claim_deliveries(
        self, *, now: float, node: str, lease_s: float, limit: int
    ) -> list[dict[str, Any]]:
        """Lease up to `limit` due pending deliveries to `node`, at most one per subscription.

        A subscription with a delivery leased until after `now` gets none. Each comes with its
        subscription's `url`, `secret`, `previous_secret` and `previous_secret_expires_at`.
        """
        ...

    async def finish_delivery(self, delivery_id: str, node: str, changes: dict[str, Any]) -> bool:
        """Record an attempt's outcome and end `node`'s lease, if it still holds it; say whether it did."""
        ...

    async def release_leases(self, node: str) -> int:
        """End every lease `node` holds (it is starting or stopping: nothing of it is in flight)."""
        ...

    async def count_deliveries(self) -> dict[str, int]:
        """How many deliveries are in each state (pending, delivered, dead), over every subscription."""
        ...

    async def prune_deliveries(self, before: float) -> int:
        """Delete delivered and dead deliveries made before `before`; return how many."""
        ...

    async def next_delivery_at(self, *, now: float) -> float | None:
        """When the soonest pending delivery of a subscription with none leased at `now` is due, if any."""
        ...

    async def list_deliveries(
        self, webhook_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        """A subscription's deliveries, newest first, optionally in one state."""
        ...

    async def redeliver(
        self, webhook_id: str, delivery_id: str, now: float
    ) -> tuple[dict[str, Any], bool] | None:
        """Make a delivered or dead delivery pending again, attempts reset; (it, whether it changed)."""
        ...

    async def delivery_summaries(self, webhook_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per subscription: `pending` and `dead` counts, `last_status` and `last_delivery_at`."""
        ...

    # operator accounts and web sessions

    async def insert_user(self, record: dict[str, Any]) -> bool:
        """Store a new operator account; False when the name exists."""
        ...

    async def get_user(self, name: str) -> dict[str, Any] | None:
        """An account with every column, its password hash included."""
        ...

    async def list_users(self) -> list[dict[str, Any]]:
        """Every account by name, without password hashes."""
        ...

    async def update_user(self, name: str, fields: dict[str, Any]) -> bool:
        """Set `fields` of an account (ValueError for a column that may not change); False if none."""
        ...

    async def add_signin_failure(self, name: str) -> int | None:
        """Count one more failed sign-in, atomically; return the new count, None if no such account."""
        ...

    async def delete_user(self, name: str) -> bool:
        """Delete an account and its sessions, in one transaction."""
        ...

    async def insert_session(self, record: dict[str, Any]) -> None: ...
    async def get_session(self, id_hash: str) -> dict[str, Any] | None:
        """A session with its user's current `role`; None once the user is gone."""
        ...

    async def touch_session(self, id_hash: str, *, last_seen_at: float, expires_at: float) -> None: ...
    async def delete_session(self, id_hash: str) -> bool: ...
    async def delete_sessions(self, user_name: str) -> int:
        """Delete every session of `user_name`; return how many there were."""
        ...

    async def prune_sessions(self, now: float) -> int:
        """Delete the sessions expired at `now`; return how many."""
        ...

    # SIEM forwarding (its own queue)

    async def claim_siem(
        self, *, now: float, node: str, lease_s: float, limit: int, filled_before: float
    ) -> tuple[str, list[dict[str, Any]]] | None:
        """Lease to `node` up to `limit` due rows of one kind, alerts first, oldest first: (kind, rows).

        Only a full batch, or one whose oldest row was queued before `filled_before`, is taken.
        Rows carry `seq`, `body` (JSON bytes), `attempts` and `created_at`.
        """
        ...

    async def finish_siem(self, seqs: list[int]) -> int:
        """Delete forwarded rows; return how many were still there."""
        ...

    async def retry_siem(self, seqs: list[int], node: str, next_attempt_at: float) -> int:
        """Count a failed attempt on the rows `node` leased and end the lease until `next_attempt_at`."""
        ...

    async def release_siem_leases(self, node: str) -> int:
        """End every SIEM lease `node` holds (it is starting or stopping: nothing of it is in flight)."""
        ...

    async def next_siem_at(self, *, now: float, fill_s: float) -> float | None:
        """When the soonest batch of unleased rows is due, its oldest row given `fill_s` to fill; if any."""
        ...

    async def siem_queue_depth(self) -> int:
        """How many rows the SIEM queue holds."""
        ...

    async def trim_siem_queue(self, max_rows: int) -> int:
        """Delete the oldest events (never alerts) beyond `max_rows` rows in all; return how many."""
        ...

    # agent throttles

    async def set_throttle(self, record: dict[str, Any], *, replace: bool) -> dict[str, Any]:
        """Throttle `record["agent_id"]`, keeping one in force unless `replace`; return the one in force."""
        ...

    async def get_throttle(self, agent_id: str) -> dict[str, Any] | None: ...
    async def list_throttles(self) -> list[dict[str, Any]]:
        """Every throttle in force, by agent id."""
        ...

    async def delete_throttle(self, agent_id: str) -> bool:
        """Lift an agent's throttle; say whether there was one."""
        ...


def _heartbeat_write_delay_s(settings: Settings) -> float:
    # An agent sends its next heartbeat an interval after the ack, which follows the commit: the
    # delay stays well inside the interval, and inside the slack before the agent counts as late.
    interval = settings.heartbeat_interval_s
    slack = (settings.heartbeat_late_after - 1) * interval
    return min(settings.heartbeat_write_delay_s, interval / 4, slack / 2)


def create_store(settings: Settings, *, on_commit: Callable[[int, float], None] | None = None) -> Store:
    """The backend `settings` choose: PostgreSQL when `database_url` is set, else the SQLite file."""
    from hub.store.sql import StoreOptions

    options = StoreOptions(
        commit_max_events=settings.commit_max_events,
        node_id=settings.node_id,
        deferred_write_delay_s=_heartbeat_write_delay_s(settings),
        retry_after_ms=settings.retry_after_ms,
        on_commit=on_commit,
        agent_groups=settings.agent_groups,  # webhook routing by agent group, applied as notices are queued
    )
    if settings.database_url is not None:
        from hub.store.postgres import PostgresStore  # asyncpg only where it is used

        return PostgresStore(
            settings.database_url.get_secret_value(),
            pool_size=settings.database_pool_size,
            command_timeout_s=settings.database_timeout_s,
            **options,
        )
    from hub.store.sqlite import SqliteStore

    return SqliteStore(
        settings.db_path,
        busy_timeout_s=settings.sqlite_busy_timeout_s,
        wal_limit_bytes=settings.sqlite_wal_limit_bytes,
        **options,
    )
