"""The hub's settings: one object, read from `HUB_*` environment variables and `.env`."""

from __future__ import annotations

import socket
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_rule_files() -> list[Path]:
    """Return the rule files shipped with the hub."""
    return [Path(str(resources.files("hub") / "rulesets" / "default.toml"))]


class Settings(BaseSettings):
    """Every knob of the hub, validated at start; nothing else reads the environment."""

    model_config = SettingsConfigDict(
        env_prefix="HUB_", env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # listener
    host: str = "127.0.0.1"
    node_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=128, description="this hub node's name"
    )
    node_lease_s: float = Field(
        15.0, gt=0, description="how long this node's hold on node_id lasts unrenewed (renewed every third)"
    )
    max_clock_skew_s: float = Field(
        2.0,
        gt=0,
        description="how far this node's clock may be off the shared store's before it logs an error",
    )
    port: int = Field(8443, ge=0, le=65535)
    data_dir: Path = Path("data")
    certs_dir: Path = Path("certs")
    dev_insecure: bool = Field(
        False, description="plain HTTP, agents identified without a certificate: development only"
    )

    # behind a proxy (README "Behind nginx")
    trusted_proxies: list[IPvAnyNetwork | Literal["unix"]] = Field(
        default_factory=list,
        description='addresses (CIDRs) whose X-SSL-Client-Cert header identifies agents; "unix": '
        'connections on unix_socket, e.g. ["127.0.0.1/32", "unix"] (JSON in the env)',
    )
    listen_tls: bool = Field(
        True, description="TLS on host:port; off only behind trusted_proxies, which then terminate TLS"
    )
    unix_socket: Path | None = Field(
        None, description="also listen on this unix socket (plain HTTP), for a proxy on the same machine"
    )

    # several nodes (README "Several nodes: Redis")
    redis_url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db (rediss:// for TLS, unix:///path.sock): the Redis "
        "that nodes sharing one store use for commands, revocations and dashboard pushes (unset: one node)",
    )
    redis_prefix: str = Field(
        "agenthub",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="prefix of the Redis channels: the same on every node of a hub, another for another hub",
    )

    # agent certificates
    agent_cert_days: int = Field(365, gt=0, le=3650, description="validity of certificates the API signs")

    # operator tokens
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "agenthub"
    jwt_audience: str = "agenthub-api"
    token_default_ttl_s: int = Field(3600, gt=0)
    token_revocation_cache_s: float = Field(
        1.0, ge=0, description="how long a token is known not revoked before the store is asked again"
    )

    # wire limits (PROTOCOL.md: 1,000 events and 1 MiB per batch)
    max_batch_events: int = Field(1000, gt=0)
    max_batch_bytes: int = Field(1024 * 1024, gt=0)
    max_frame_bytes: int = Field(
        2 * 1024 * 1024, gt=0, description="Engine.IO frame limit; a larger frame closes the socket"
    )
    connect_timeout_s: float = Field(
        15.0, gt=0, description="an Engine.IO connection that has not joined /agent in this long is closed"
    )
    max_connecting_per_address: int = Field(
        256,
        gt=0,
        description="Engine.IO connections from one address that have not joined /agent yet (their "
        "certificate unchecked); a new one past this is refused with 429",
    )
    max_event_bytes: int = Field(
        16 * 1024, gt=0, description="largest single event, measured as stored (msgpack)"
    )
    max_metadata_depth: int = Field(8, gt=0)

    # ingest
    ingest_max_pending_events: int = Field(
        100_000, gt=0, description="events waiting for commit or scoring before 'overloaded'"
    )
    scoring_max_backlog: int = Field(
        5_000,
        gt=0,
        description="stored events waiting for scoring that may change a score (most cannot: no rule "
        "matches them and they start or end no process) before new batches wait",
    )
    scoring_takeover_s: float = Field(
        30.0, gt=0, description="how long a batch another node stored waits unscored before this one takes it"
    )
    scoring_wait_s: float = Field(
        5.0, gt=0, description="longest a batch waits for scoring before 'overloaded'"
    )
    agent_max_events_per_s: float = Field(20_000.0, gt=0, description="events a second one agent may sustain")
    agent_burst_events: int = Field(
        60_000,
        gt=0,
        description="events one agent may send at once (a spool flush); at least max_batch_events",
    )
    sqlite_busy_timeout_s: float = Field(
        5.0, gt=0, description="how long a write waits for a lock another process holds before `unavailable`"
    )
    sqlite_wal_limit_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="the SQLite WAL is started over once it has grown past this, and truncated back to it",
    )
    database_url: SecretStr | None = Field(
        None,
        description="postgresql://user:password@host:port/db: the PostgreSQL store several nodes share "
        "(unset: the SQLite file in data_dir)",
    )
    database_pool_size: int = Field(10, gt=0, le=1000, description="PostgreSQL connections per node at most")
    database_timeout_s: float = Field(
        30.0, gt=0, description="longest a PostgreSQL statement may take before the write is `unavailable`"
    )
    commit_max_events: int = Field(5_000, gt=0, description="most events in one group commit")
    retry_after_ms: int = Field(1000, gt=0)
    max_batches_in_flight: int = Field(
        16, gt=0, description="unacked batches one agent socket may have before 'overloaded'"
    )
    max_processes_per_agent: int = Field(
        50_000, gt=0, description="live processes scored per agent; the oldest riskless go first"
    )

    # liveness
    heartbeat_interval_s: float = Field(10.0, gt=0)
    heartbeat_late_after: float = Field(1.5, gt=1, description="intervals before 'late'")
    heartbeat_offline_after: float = Field(3.0, gt=1, description="intervals before 'offline'")
    heartbeat_history_s: float = Field(
        86_400.0, gt=0, description="how long each agent's heartbeats are kept for its charts"
    )
    heartbeat_write_delay_s: float = Field(
        0.5,
        ge=0,
        le=5,
        description="longest a heartbeat waits for others to share its commit (0: none; "
        "at most a quarter of heartbeat_interval_s, and half the slack heartbeat_late_after leaves)",
    )

    # graceful stop (SIGTERM); systemd/agenthub.service's TimeoutStopSec covers the default
    drain_timeout_s: float = Field(
        10.0, gt=0, description="longest a stopping hub waits for batches under way to be committed and acked"
    )
    drain_reconnect_window_s: float = Field(
        5.0, ge=0, description="a stopping hub tells each agent to reconnect after a random delay up to this"
    )
    handover_grace_s: float = Field(
        60.0,
        ge=0,
        description="webhooks hear that a stopping hub sent an agent away only if it has not connected again "
        "(to any node) within this; if it has, neither its going nor its return is announced (0: at once)",
    )

    # risk model (DESIGN.md)
    rule_files: list[Path] = Field(default_factory=default_rule_files)
    risk_half_life_s: float = Field(600.0, gt=0)
    risk_k: float = Field(50.0, gt=0)
    risk_inherit_fraction: float = Field(0.5, ge=0, le=1)
    risk_thresholds: list[float] = Field(default_factory=lambda: [50.0, 80.0])
    risk_hysteresis: float = Field(10.0, ge=0)
    explanation_top: int = Field(5, gt=0)

    # dashboards
    push_snapshot_top: int = Field(100, gt=0)
    push_max_dashboards: int = Field(500, gt=0, description="dashboard connections one node serves at most")
    push_max_dashboards_per_principal: int = Field(
        20, gt=0, description="dashboard connections one token subject may hold at once"
    )
    push_send_timeout_s: float = Field(
        10.0, gt=0, description="a dashboard that takes no data for this long is cut off"
    )
    push_stats_interval_s: float = Field(
        1.0, gt=0, description="how often dashboards are pushed the hub's event rate and health"
    )
    push_max_pending: int = Field(
        10_000, gt=0, description="coalesced updates held per slow subscriber before dropping"
    )

    # operator accounts and web sessions
    session_idle_s: float = Field(
        8 * 3600.0, gt=0, description="a web session unused for this long ends (operators sign in again)"
    )
    session_max_s: float = Field(24 * 3600.0, gt=0, description="a web session ends this long after sign-in")
    signin_max_failures: int = Field(
        5, gt=0, description="failed sign-ins in a row before the account is locked for a while"
    )
    signin_lockout_s: float = Field(
        30.0, gt=0, description="first lockout; each further failure doubles it, up to signin_lockout_max_s"
    )
    signin_lockout_max_s: float = Field(900.0, gt=0, description="longest lockout after failed sign-ins")

    # operator API
    api_max_body_bytes: int = Field(
        1024 * 1024 + 64 * 1024, gt=0, description="largest request body (a full events batch fits)"
    )
    rate_limit_per_s: float = Field(50.0, gt=0, description="requests a second each principal may sustain")
    rate_limit_burst: int = Field(200, gt=0, description="requests a principal may make at once")
    rate_limit_address_per_s: float = Field(
        200.0, gt=0, description="requests a second one client address may sustain, before authentication"
    )
    rate_limit_address_burst: int = Field(1000, gt=0, description="requests one address may make at once")
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins besides the hub's own that may open /ws/live"
    )
    idempotency_ttl_s: float = Field(86_400.0, gt=0, description="how long an Idempotency-Key is remembered")
    hmac_max_skew_s: float = Field(
        300.0, gt=0, description="how far a signed agent request's timestamp may be from the hub's clock"
    )

    # agent commands
    command_default_ttl_s: float = Field(
        3600.0, gt=0, description="how long a command may wait for delivery and its ack before it expires"
    )
    command_max_ttl_s: float = Field(172_800.0, gt=0, description="the longest TTL a command may ask for")
    command_default_wait_s: float = Field(
        10.0, ge=0, description="how long a send request waits for the ack before answering"
    )
    command_max_wait_s: float = Field(60.0, ge=0, description="the longest wait a send request may ask for")
    command_max_args_bytes: int = Field(16 * 1024, gt=0, description="largest command args, as JSON")
    command_max_ack_bytes: int = Field(
        64 * 1024, gt=0, description="largest agent ack, as JSON; a larger one fails the command"
    )
    command_sweep_interval_s: float = Field(1.0, gt=0, description="how often expired commands are swept")

    # alerts and their routing (hub.scoring, hub.notify)
    alert_suppression_window_s: float = Field(
        300.0,
        ge=0,
        description="a repeat of an unresolved alert (same rule, agent and process lineage) last seen "
        "this recently folds into it, counted, instead of raising a new one (0: never fold)",
    )
    agent_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description='agent groups webhooks may route by: group -> agent id globs, e.g. {"web": ["web-*"]} '
        "(JSON in the env)",
    )

    # webhooks (hub.notify): where deliveries may go
    webhook_allow: list[IPvAnyNetwork] = Field(
        default_factory=list,
        # HUB_WEBHOOK_ALLOWED_NETWORKS, its first name, is still read.
        validation_alias=AliasChoices("webhook_allow", "HUB_WEBHOOK_ALLOW", "HUB_WEBHOOK_ALLOWED_NETWORKS"),
        description='CIDRs webhooks may reach although not public, e.g. ["10.1.2.0/24"] (JSON in the env)',
    )
    webhook_allow_http: bool = Field(
        False, description="accept plain-http webhook URLs (bodies are signed, but readable on the way)"
    )
    webhook_max_url_chars: int = Field(2048, gt=0, description="longest webhook URL")
    webhook_resolve_timeout_s: float = Field(
        5.0, gt=0, description="longest wait for DNS when checking where a webhook URL leads"
    )
    webhook_max_subscriptions: int = Field(100, gt=0, description="most webhook subscriptions the hub keeps")
    webhook_max_secret_overlap_s: float = Field(
        86_400.0, ge=0, description="longest a rotated-out webhook secret may keep signing beside the new one"
    )
    # webhooks (hub.deliveries): how deliveries are sent and retried
    webhook_max_attempts: int = Field(8, gt=0, description="attempts before a webhook delivery is dead")
    webhook_retry_base_s: float = Field(
        1.0, gt=0, description="first retry delay bound; it doubles each attempt (full jitter)"
    )
    webhook_retry_max_s: float = Field(600.0, gt=0, description="longest delay between delivery attempts")
    webhook_timeout_s: float = Field(10.0, gt=0, description="longest one delivery attempt may take")
    webhook_max_concurrency: int = Field(
        32, gt=0, description="delivery attempts in flight at once on this node (one per webhook)"
    )
    webhook_delivery_retention_s: float = Field(
        7 * 86_400.0, gt=0, description="how long delivered and dead deliveries are kept for operators to see"
    )
    webhook_poll_interval_s: float = Field(
        1.0, gt=0, description="how often the outbox is checked for due deliveries (other nodes' too)"
    )
    webhook_certificate_expiring_days: float = Field(
        14.0,
        gt=0,
        description="certificate_expiring is sent once a certificate expires within this many days",
    )
    webhook_certificate_check_interval_s: float = Field(
        3600.0, gt=0, description="how often certificates are checked for coming expiry"
    )

    # SIEM forwarding
    siem_endpoint: str | None = Field(
        None, description="base URL of the SIEM API (e.g. https://siem.example.com); unset: forwarding off"
    )
    siem_api_key: SecretStr | None = Field(None, description="bearer key sent to the SIEM")
    siem_batch_max: int = Field(100, gt=0, description="most alerts or events in one SIEM request")
    siem_batch_interval_s: float = Field(
        2.0, ge=0, description="longest an item waits for its batch to fill before it is sent"
    )
    siem_timeout_s: float = Field(10.0, gt=0, description="longest one SIEM request may take")
    siem_retry_base_s: float = Field(
        1.0, gt=0, description="first SIEM retry delay bound; it doubles each failure (full jitter)"
    )
    siem_retry_max_s: float = Field(300.0, gt=0, description="longest delay between SIEM retries")
    siem_max_queue: int = Field(
        100_000, gt=0, description="most rows the SIEM queue holds; beyond it the oldest events are dropped"
    )
    siem_min_event_severity: Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"] = Field(
        "HIGH", description="events matching a rule of at least this severity are forwarded"
    )
    siem_allow_http: bool = Field(False, description="accept a plain-http SIEM endpoint")

    # anomaly detection (hub.anomaly): each agent's event rate and mix of kinds against its own baseline
    anomaly_interval_s: float = Field(10.0, gt=0, description="length of the intervals events are counted in")
    anomaly_span_intervals: int = Field(
        30, gt=0, description="span of the exponentially weighted baseline, in intervals"
    )
    anomaly_warmup_intervals: int = Field(
        12, ge=1, description="intervals an agent's baseline learns before anything is judged against it"
    )
    anomaly_z_threshold: float = Field(
        6.0, gt=0, description="a burst is this many standard deviations above the baseline mean"
    )
    anomaly_min_factor: float = Field(
        5.0, ge=1, description="a burst is also at least this many times the mean"
    )
    anomaly_min_events: int = Field(
        500, gt=0, description="a burst (or a kind-mix shift) needs at least this many events in its interval"
    )
    anomaly_silence_intervals: int = Field(
        6, gt=0, description="intervals without events, while connected, that make a silence"
    )
    anomaly_silence_min_mean: float = Field(
        20.0,
        gt=0,
        description="only agents whose baseline holds this many events an interval fall silent",
    )
    anomaly_mix_shift: float = Field(
        0.5, gt=0, le=1, description="a kind's share of an interval above its baseline share by this much"
    )
    anomaly_throttle: bool = Field(False, description="throttle an agent automatically on a burst")
    anomaly_throttle_events_per_s: float = Field(
        100.0, gt=0, description="events a second a throttled agent may send until an operator lifts it"
    )

    # logs and metrics (hub.observability)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field(
        "json", description="`agenthub serve` logs on stderr: one JSON object a line, or plain text"
    )
    metrics_listen: str | None = Field(
        None,
        description="host:port of a plain-HTTP listener serving only /metrics, for scrapers without "
        "a token (e.g. 127.0.0.1:9464); off by default (/api/v1/metrics needs hub:read)",
    )

    @field_validator("risk_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < t < 100 for t in value):
            raise ValueError("risk thresholds must be between 0 and 100 (exclusive)")
        return sorted(value)

    @field_validator("metrics_listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            _split_address(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "database_url must be a postgresql:// URL"
            )  # never echo it: it may hold a password
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")  # never echo it
        return value

    @model_validator(mode="after")
    def _offline_after_late(self) -> Settings:
        if self.heartbeat_offline_after <= self.heartbeat_late_after:
            raise ValueError("heartbeat_offline_after must be larger than heartbeat_late_after")
        if self.max_frame_bytes < self.max_batch_bytes:
            raise ValueError("max_frame_bytes must be at least max_batch_bytes")
        if self.agent_burst_events < self.max_batch_events:
            raise ValueError(
                "agent_burst_events must be at least max_batch_events, or a full batch never passes"
            )
        return self

    @model_validator(mode="after")
    def _plain_listener_behind_proxy(self) -> Settings:
        if not self.listen_tls and not self.trusted_proxies and not self.dev_insecure:
            raise ValueError(
                "listen_tls=false needs trusted_proxies (the proxy verifies agent certificates); "
                "without a proxy only dev_insecure serves plain HTTP"
            )
        return self

    @model_validator(mode="after")
    def _command_defaults_within_limits(self) -> Settings:
        if self.command_default_ttl_s > self.command_max_ttl_s:
            raise ValueError("command_default_ttl_s must be at most command_max_ttl_s")
        if self.command_default_wait_s > self.command_max_wait_s:
            raise ValueError("command_default_wait_s must be at most command_max_wait_s")
        return self

    @model_validator(mode="after")
    def _siem_endpoint_usable(self) -> Settings:
        if self.siem_endpoint is None:
            return self
        scheme, _, rest = self.siem_endpoint.partition("://")
        if scheme not in ("https", "http") or not rest.strip("/"):
            raise ValueError("siem_endpoint must be an https:// URL")
        if scheme == "http" and not self.siem_allow_http:
            raise ValueError("siem_endpoint must use https (siem_allow_http accepts plain http)")
        if self.siem_api_key is None:
            raise ValueError("siem_api_key is required with siem_endpoint")
        return self

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The separate metrics listener's (host, port), when one is configured."""
        return None if self.metrics_listen is None else _split_address(self.metrics_listen)


def _split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:9464
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)
