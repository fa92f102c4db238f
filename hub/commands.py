"""Agent commands: a stored lifecycle, delivery at most once, and callers waiting for the ack.

Every command moves one way through these states; each change is stored first, then pushed
to dashboards as a `command` message carrying the command's view:

    queued ──▶ delivered ──▶ completed   the agent acked with ok: true
       │           ├───────▶ failed      the agent acked with ok: false, or sent a malformed ack
       └───────────┴───────▶ expired     the TTL passed before an ack

- A command is stored `queued` before anything is sent, so a command for an offline agent
  waits for it: after the agent's next `hello` its queued commands are sent, oldest first.
- Delivery is at most once. A command is marked `delivered` durably *before* it is written
  to the socket, and never sent again: unlike an event, a command may not be safe to repeat.
  If the socket drops before the ack (or the hub restarts), the command expires at its TTL
  and the operator decides whether to send a new one. Only when nothing was written (the
  agent left while the command was being marked) does it go back to `queued`.
- An ack arriving after the caller stopped waiting still completes the command; one arriving
  after the TTL changes nothing (`expired` is final, like `completed` and `failed`).
- Commands are idempotent by id (Stripe's Idempotency-Key rule, applied to the command id):
  sending an id again with the same agent, name and args answers the existing command in
  its current state and sends nothing; the same id with other content is a conflict. The
  first request's TTL stands.
- Commands go only to agents the hub has seen (a 404 otherwise): a typo in an agent id must
  not leave a command waiting for an agent that will never come.
- Delivery happens on the node holding the agent's socket, through `Courier`, and only over
  the connection the store records as the agent's: a node that has not yet noticed that its
  socket went stale (the agent reconnected elsewhere) leaves the command queued. With several
  nodes every change above also reaches the other nodes over the push bus (`follow_remote`):
  a node seeing `queued` delivers the agent's queued commands if the agent is on it (so a
  command sent through any node reaches the agent on its own), and a final state wakes the
  callers waiting on any node. python-socketio's Redis manager could relay the emit and its
  ack instead, but the sending node could not tell whether the socket had its hello or was
  gone: the command would be marked delivered and lost rather than kept queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, Required

import orjson
from pydantic import ConfigDict, StrictBool, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.config import Settings
from hub.models import AGENT_ID_PATTERN, Publisher
from hub.problems import Conflict, InvalidInput, NotFound
from hub.store import Page, Store

log = logging.getLogger(__name__)
AckHandler = Callable[..., Awaitable[None]]

CommandState = Literal["queued", "delivered", "completed", "failed", "expired"]
FINAL_STATES = frozenset({"completed", "failed", "expired"})
# The agent id alphabet: no leading dot keeps every id addressable in a URL path.
COMMAND_ID_PATTERN = AGENT_ID_PATTERN
COMMAND_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
# The error an expired command records, by the state it expired from.
_EXPIRED_ERRORS = {
    "queued": "expired before delivery: the agent did not connect within the TTL",
    "delivered": "expired before an ack: the agent did not answer within the TTL",
}


class CommandView(TypedDict):
    """A command as stored and shown: what was asked, of whom, by whom, and how it went."""

    id: str
    agent_id: str
    name: str
    args: dict[str, Any]
    state: CommandState
    created_at: float
    delivered_at: float | None
    completed_at: float | None  # when it reached its final state: completed, failed or expired
    expires_at: float
    result: dict[str, Any] | None
    error: str | None
    created_by: str


class CommandMessage(TypedDict):
    """The `command` event sent to an agent (PROTOCOL.md)."""

    id: str
    name: str
    args: dict[str, Any]


@with_config(ConfigDict(extra="ignore"))
class CommandAck(TypedDict, total=False):
    """An agent's answer to `command`; `result` and `error` may be left out when null."""

    id: Required[str]
    ok: Required[StrictBool]
    result: dict[str, Any] | None
    error: str | None


_ACK_ADAPTER: TypeAdapter[CommandAck] = TypeAdapter(CommandAck)


class Courier(Protocol):
    """Reaches an agent's socket; the agent transport implements it."""

    def connection(self, agent_id: str) -> tuple[str, float] | None:
        """The agent's socket here that got its hello, as the store knows it: (node, connected_at)."""
        ...

    async def send_command(self, agent_id: str, message: CommandMessage, on_ack: AckHandler) -> bool:
        """Write `message` to the agent's socket, `on_ack(*ack)` to follow; False if it is gone."""
        ...


class CommandService:
    """Store, deliver, settle and expire agent commands; see the module docstring."""

    def __init__(self, settings: Settings, store: Store, publish: Publisher) -> None:
        self._settings = settings
        self._store = store
        self._publish = publish
        self._courier: Courier | None = None
        # One lock per agent seen since start: its commands leave in creation order.
        self._delivering: dict[str, asyncio.Lock] = {}
        # Set when a command reaches a final state; held only while someone waits on it.
        self._settled: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()
        self._stopping = False

    def attach(self, courier: Courier) -> None:
        """Deliver through `courier` (the agent transport, which is built after this service)."""
        self._courier = courier

    async def send(
        self,
        agent_id: str,
        name: str,
        args: dict[str, Any],
        *,
        created_by: str,
        command_id: str | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store a command, deliver it if the agent is here, and wait up to `wait_s` for its end.

        Return the command's view when the wait ends, and whether this call created it
        (False: an idempotent replay of an existing command).
        """
        ttl = self._bounded(
            "ttl_s", ttl_s, self._settings.command_default_ttl_s, self._settings.command_max_ttl_s
        )
        wait = self._bounded(
            "wait_s", wait_s, self._settings.command_default_wait_s, self._settings.command_max_wait_s
        )
        self._check_args(args)
        await self._known_agent(agent_id)
        now = time.time()
        command = {
            "id": command_id or str(uuid.uuid4()),
            "agent_id": agent_id,
            "name": name,
            "args": args,
            "state": "queued",
            "created_at": now,
            "delivered_at": None,
            "completed_at": None,
            "expires_at": now + ttl,
            "result": None,
            "error": None,
            "created_by": created_by,
        }
        stored, created = await self._store.insert_command(command)
        if not created and any(stored[field] != command[field] for field in ("agent_id", "name", "args")):
            raise Conflict(
                f"command id {stored['id']!r} is already used by another command; choose a new id",
                command_id=stored["id"],
            )
        if created:
            self._changed(stored)
        if stored["state"] == "queued":
            await self.deliver_queued(agent_id)
        return await self._wait(stored["id"], wait), created

    async def get(self, command_id: str) -> dict[str, Any]:
        """Return one command's view."""
        view = await self._store.get_command(command_id)
        if view is None:
            raise NotFound(f"no command {command_id!r}")
        return view

    async def list_for_agent(
        self, agent_id: str, *, state: str | None, after: list[Any] | None, limit: int
    ) -> Page:
        """List an agent's commands, newest first, optionally in one state."""
        await self._known_agent(agent_id)
        return await self._store.list_commands(agent_id, state=state, after=after, limit=limit)

    async def deliver_queued(self, agent_id: str) -> None:
        """Send `agent_id`'s queued commands, oldest first, if its socket is on this node."""
        if self._courier is None or self._courier.connection(agent_id) is None:
            return
        lock = self._delivering.setdefault(agent_id, asyncio.Lock())
        try:
            async with lock:
                for command in await self._store.queued_commands(agent_id, time.time()):
                    if not await self._deliver(self._courier, command):
                        return
        except Exception:  # the commands stay queued: the agent's next hello tries again
            log.exception("delivering queued commands to %s failed", agent_id)

    async def expire_loop(self) -> None:
        """Expire commands whose TTL passed, every `command_sweep_interval_s`; runs until cancelled."""
        while True:
            await asyncio.sleep(self._settings.command_sweep_interval_s)
            try:
                for view in await self._store.expire_commands(time.time(), _EXPIRED_ERRORS):
                    self._changed(view)
            except Exception:  # the store failed: expiry must keep being checked
                log.exception("expiring commands failed; will retry")

    async def follow_remote(self, view: dict[str, Any]) -> None:
        """Act on another node's change: deliver `queued` if the agent is here; wake waiters at an end."""
        if view["state"] == "queued":
            await self.deliver_queued(view["agent_id"])
        elif view["state"] in FINAL_STATES and (settled := self._settled.get(view["id"])) is not None:
            settled.set()

    def release_waiters(self) -> None:
        """Answer every caller still waiting for an ack at once (the hub is shutting down)."""
        self._stopping = True
        for event in list(self._settled.values()):
            event.set()

    async def _deliver(self, courier: Courier, command: dict[str, Any]) -> bool:
        """Mark one command delivered, then write it; False when the agent has gone from here."""
        now = time.time()
        # `expires_at` never changes: checked against the `now` stored, it is as good as a store condition.
        if now >= command["expires_at"]:  # its TTL passed while earlier commands went out
            return True
        via = courier.connection(command["agent_id"])
        if via is None:
            return False
        # Only over the connection the store names: a socket here may be a stale one, whose
        # agent has reconnected to another node before this node noticed the loss.
        delivered = await self._store.transition_command(
            command["id"], expect=("queued",), changes={"state": "delivered", "delivered_at": now}, via=via
        )
        if delivered is None:  # it ended meanwhile (expired, delivered by another node), or the agent moved
            current = await self._store.get_command(command["id"])
            return current is None or current["state"] != "queued"
        # Announced before the write: an ack can then never be overtaken by its delivery.
        self._changed(delivered)
        message = CommandMessage(id=command["id"], name=command["name"], args=command["args"])
        if await courier.send_command(
            command["agent_id"],
            message,
            functools.partial(self._on_ack, command["id"], command["expires_at"]),
        ):
            return True
        # Nothing reached a socket: the command waits for the agent's next hello.
        requeued = await self._store.transition_command(
            command["id"], expect=("delivered",), changes={"state": "queued", "delivered_at": None}
        )
        if requeued is not None:
            self._changed(requeued)
        return False

    async def _on_ack(self, command_id: str, expires_at: float, *ack: Any) -> None:
        # The transport calls this with the agent's ack arguments, maybe long after the send.
        now = time.time()
        if now >= expires_at:  # `expired` is the only end left to it: the sweep records that
            log.info("ignored an ack for command %s: it came after the TTL", command_id)
            return
        changes = {**_outcome(command_id, ack, self._settings.command_max_ack_bytes), "completed_at": now}
        try:
            done = await self._store.transition_command(command_id, expect=("delivered",), changes=changes)
        except Exception:
            log.exception("recording the ack of command %s failed", command_id)
            return
        if done is None:
            log.info("ignored an ack for command %s: it had already ended", command_id)
            return
        self._changed(done)

    def _changed(self, view: dict[str, Any]) -> None:
        log.info("command %s (%s) for %s is %s", view["id"], view["name"], view["agent_id"], view["state"])
        self._publish("command", view["id"], view)
        if view["state"] in FINAL_STATES and (settled := self._settled.get(view["id"])) is not None:
            settled.set()

    async def _wait(self, command_id: str, wait_s: float) -> dict[str, Any]:
        # Registered before the first read: a final state stored after that read sets it.
        settled = self._settled.get(command_id)
        if settled is None:
            settled = self._settled[command_id] = asyncio.Event()
        view = await self.get(command_id)
        if wait_s > 0 and view["state"] not in FINAL_STATES and not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), wait_s)
            view = await self.get(command_id)
        return view

    async def _known_agent(self, agent_id: str) -> None:
        if await self._store.get_agent(agent_id) is None:
            raise NotFound(f"no agent {agent_id!r} has connected to this hub")

    def _check_args(self, args: dict[str, Any]) -> None:
        size, limit = len(orjson.dumps(args)), self._settings.command_max_args_bytes
        if size > limit:
            raise InvalidInput(
                f"args take {size} bytes as JSON; the limit is {limit} (command_max_args_bytes)"
            )

    @staticmethod
    def _bounded(name: str, value: float | None, default: float, limit: float) -> float:
        if value is None:
            return default
        if value > limit:
            raise InvalidInput(f"{name} must be at most {limit:g} s (command_max_{name}), got {value:g}")
        return value


def _outcome(command_id: str, ack: tuple[Any, ...], max_bytes: int) -> dict[str, Any]:
    """Turn an agent's ack arguments into the command's final state, result and error."""
    if len(ack) != 1:
        return _malformed(f"expected one ack object, got {len(ack)} values")
    try:
        size = len(orjson.dumps(ack[0]))
    except TypeError:  # binary attachments and the like: not JSON
        return _malformed("the ack is not JSON")
    if size > max_bytes:
        return _malformed(
            f"the ack takes {size} bytes as JSON; the limit is {max_bytes} (command_max_ack_bytes)"
        )
    try:
        answer = _ACK_ADAPTER.validate_python(ack[0])
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(map(str, error["loc"])) or "ack"
        return _malformed(f"{where}: {error['msg']}")
    if answer["id"] != command_id:
        return _malformed(f"the ack names command {answer['id']!r}")
    result, error_text = answer.get("result"), answer.get("error")
    if answer["ok"]:
        return {"state": "completed", "result": result, "error": None}
    return {
        "state": "failed",
        "result": result,
        "error": error_text or "the agent reported a failure without a reason",
    }


def _malformed(reason: str) -> dict[str, Any]:
    return {"state": "failed", "result": None, "error": f"malformed ack from the agent: {reason}"}
