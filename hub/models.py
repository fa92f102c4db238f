"""Wire and domain shapes (PROTOCOL.md); no I/O here.

Events are TypedDicts validated by a pydantic TypeAdapter: on the ingest hot path that is
measurably cheaper than BaseModel instances and the result is the plain dict we store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Required, get_args

from pydantic import ConfigDict, Field, JsonValue, StringConstraints, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

# A dashboard push: (kind, key, data); the key coalesces a slow dashboard's updates.
Publisher = Callable[[str, str, dict[str, Any]], None]

EventKind = Literal[
    "process_start",
    "process_exit",
    "syscall",
    "net_connect",
    "net_listen",
    "file_open",
    "file_write",
    "file_delete",
    "module_load",
    "login",
    "custom",
]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)

# Fixed field bounds; the configurable size of a whole event (`max_event_bytes`) is checked
# by `hub.ingest` on the stored encoding, one length test that bounds every field at once.
ShortStr = Annotated[str, StringConstraints(max_length=256)]
AGENT_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
class Event(TypedDict, total=False):
    """One observation from an agent; `(agent_id, seq)` is its identity."""

    seq: Required[Annotated[int, Field(ge=1, le=2**63 - 1)]]
    ts: Required[float]
    kind: Required[EventKind]
    pid: Required[Annotated[int, Field(ge=0, le=2**31)]]
    ppid: Annotated[int, Field(ge=0, le=2**31)]
    exe: str
    comm: str
    argv: list[str]
    uid: Annotated[int, Field(ge=0, le=2**32)]
    syscall: ShortStr
    path: str
    dst_ip: ShortStr
    dst_port: Annotated[int, Field(ge=0, le=65535)]
    protocol: ShortStr
    container: ShortStr
    pod: ShortStr
    namespace: ShortStr
    metadata: dict[str, JsonValue]  # JSON values only: msgpack bytes or extension types cannot be shown


@with_config(ConfigDict(extra="ignore", allow_inf_nan=False))
class _BatchEvent(Event):
    """`Event` dropping unknown fields instead of refusing them: a third cheaper to validate.

    `hub.ingest` spots an event that lost fields by its length and validates it alone with
    `EVENT_ADAPTER`, so unknown fields are still refused, with their names.
    """


EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_BATCH_ADAPTER: TypeAdapter[list[_BatchEvent]] = TypeAdapter(list[_BatchEvent])


@with_config(ConfigDict(extra="ignore"))
class Heartbeat(TypedDict, total=False):
    """Agent health, sent every `heartbeat_interval_s`."""

    ts: Required[float]
    cpu_percent: Annotated[float, Field(ge=0)]
    mem_percent: Annotated[float, Field(ge=0, le=100)]
    disk_percent: Annotated[float, Field(ge=0, le=100)]
    spool_depth: Annotated[int, Field(ge=0)]
    dropped: Annotated[int, Field(ge=0)]
    uptime_s: Annotated[float, Field(ge=0)]


HEARTBEAT_ADAPTER: TypeAdapter[Heartbeat] = TypeAdapter(Heartbeat)


@with_config(ConfigDict(extra="ignore"))
class ConnectInfo(TypedDict, total=False):
    """The optional `auth` payload of a Socket.IO connect."""

    agent_version: ShortStr
    hostname: ShortStr
    platform: ShortStr


CONNECT_INFO_ADAPTER: TypeAdapter[ConnectInfo] = TypeAdapter(ConnectInfo)


class Rejection(TypedDict):
    index: int
    seq: int | None
    error: str


class BatchAck(TypedDict):
    accepted: int
    duplicates: int
    rejected: list[Rejection]
    last_seq: int


AgentStatus = Literal["online", "late", "offline"]
PresenceReason = Literal[
    "connected",
    "heartbeat",
    "clean_disconnect",
    "missed_heartbeats",
    "transport_lost",
    "revoked",
    "superseded",
    "server_shutdown",
    "restored",  # online again: marked offline while its node could not reach the store
]
Severity = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
SEVERITY_ORDER: dict[str, int] = {"LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}


class Contribution(TypedDict):
    """One line of a score's explanation."""

    rule_id: str
    name: str
    severity: str
    mitre: list[str]
    contribution: float
    hits: int


class ScoreView(TypedDict):
    """A process's risk as the API and the dashboard show it."""

    process_id: str
    process_key: str
    agent_id: str
    pid: int
    start_ts: float
    ppid: int | None
    exe: str | None
    risk_score: float
    explanation: list[Contribution]
    updated_ts: float
    exited: bool


def score_view(record: dict[str, Any]) -> ScoreView:
    """Pick the public fields of a stored process record."""
    view: ScoreView = {name: record[name] for name in ScoreView.__annotations__}  # type: ignore[assignment]
    return view
