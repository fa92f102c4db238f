"""The `/agent` Socket.IO namespace (PROTOCOL.md): connect, hello, events, heartbeat."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import engineio
import socketio
from aiohttp import WSCloseCode, WSMsgType, web
from engineio.async_drivers import aiohttp as aiohttp_driver
from prometheus_async import aio
from prometheus_async.types import Observer
from pydantic import ValidationError

from hub.certs import is_valid_agent_id
from hub.commands import AckHandler, CommandMessage, CommandService
from hub.config import Settings
from hub.identity import (
    AgentIdentity,
    AgentTrust,
    IdentityError,
    ProxyAddress,
    client_address,
    presented_certificate,
)
from hub.ingest import Ingestor
from hub.models import CONNECT_INFO_ADAPTER, HEARTBEAT_ADAPTER, ConnectInfo, PresenceReason
from hub.observability import log_context
from hub.presence import Presence
from hub.problems import (
    HubError,
    InternalError,
    InvalidInput,
    Overloaded,
    RateLimited,
    Unavailable,
    error_ack,
)

log = logging.getLogger(__name__)
NAMESPACE = "/agent"
_RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error"})  # only the server raises these
_ADDRESS = "hub.client_address"  # environ key: the address a connection is counted under
_MAX_ATTACHMENTS = 16  # binary attachments one packet may announce; an agent sends one
_ENGINEIO_CLOSE: str = engineio.packet.Packet(engineio.packet.CLOSE).encode()
_ENGINEIO_TYPES = frozenset(str(kind) for kind in range(len(engineio.packet.packet_names)))  # "0"-"6"
_POSTED_TYPES = frozenset({engineio.packet.PONG, engineio.packet.MESSAGE, engineio.packet.CLOSE})
# WebSocket close codes of a client that closes on purpose (0: a close frame without a code).
_CLEAN_CLOSE_CODES = frozenset({0, WSCloseCode.OK, WSCloseCode.GOING_AWAY})

# python-socketio's disconnect reasons, in PROTOCOL.md's words.
_REASONS: dict[str, PresenceReason] = {
    socketio.AsyncServer.reason.CLIENT_DISCONNECT: "clean_disconnect",
    socketio.AsyncServer.reason.PING_TIMEOUT: "missed_heartbeats",
    socketio.AsyncServer.reason.TRANSPORT_CLOSE: "transport_lost",
    socketio.AsyncServer.reason.TRANSPORT_ERROR: "transport_lost",
}


class AgentNamespace(socketio.AsyncNamespace):  # type: ignore[misc]  # socketio ships no types
    """Every agent-facing handler; each parses, calls one service, returns the ack."""

    def __init__(
        self,
        settings: Settings,
        ingestor: Ingestor,
        presence: Presence,
        *,
        commands: CommandService,
        trust: AgentTrust,
        ack_latency: Observer | None = None,
    ) -> None:
        super().__init__(NAMESPACE)
        self._ack_latency = ack_latency  # observes each events batch's time to its ack
        self._commands = commands
        self._greeted: set[str] = set()  # sids that got their hello: commands may follow it
        self._settings = settings
        self._ingestor = ingestor
        self._presence = presence
        self._agents: dict[str, str] = {}  # sid -> agent id
        self._closing: dict[str, PresenceReason] = {}  # sid -> why the hub closed it
        self._in_flight: dict[str, int] = {}  # sid -> batches not yet answered
        self._batches = 0  # batches not yet answered, on all sockets
        self._answered = asyncio.Event()  # set while no batch awaits its answer
        self._answered.set()
        self._draining = False  # the hub is stopping: no new agent or batch is taken
        self._trust = trust
        self._certs: dict[str, str] = {}  # sid -> fingerprint of the certificate it connected with
        self._revoked: dict[str, str] = {}  # fingerprint -> reason, for revocations while this hub runs

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        # Every attempt gets an answer: an exception other than ConnectionRefusedError would
        # leave the client waiting for a CONNECT that never comes.
        if self._draining:  # its TCP connection was accepted just before the listener closed
            raise _refusal("unavailable", "The hub is stopping; connect again (to another node).")
        try:
            identity = await self._identify(environ, auth)
            info = CONNECT_INFO_ADAPTER.validate_python(auth if isinstance(auth, dict) else {})
            await self._admit(sid, identity, info)
        except IdentityError as refusal:
            log.warning("agent connection refused (%s): %s", refusal.code, refusal.message)
            raise _refusal(refusal.code, refusal.message) from None
        except ValidationError as exc:
            raise _refusal(
                "auth_invalid", f"The connect auth payload is invalid: {exc.errors()[0]['msg']}"
            ) from None
        except Exception:
            log.exception("admitting an agent on socket %s failed", sid)
            raise _refusal("unavailable", "The hub cannot admit agents right now; retry later.") from None

    async def _identify(self, environ: dict[str, Any], auth: Any) -> AgentIdentity:
        cert = presented_certificate(environ["aiohttp.request"], self._settings.trusted_proxies)
        if cert is None and self._settings.dev_insecure:
            agent_id = auth.get("agent_id") if isinstance(auth, dict) else None
            log.warning("DEV MODE: agent %r connected WITHOUT a client certificate", agent_id)
            if isinstance(agent_id, str):
                if not is_valid_agent_id(agent_id):
                    raise IdentityError("cn_invalid", f"{agent_id!r} is not a valid agent id.")
                return AgentIdentity(agent_id=agent_id, fingerprint="insecure", serial="")
        return await self._trust.identify(cert)

    async def _admit(self, sid: str, identity: AgentIdentity, info: ConnectInfo) -> None:
        agent_id = identity.agent_id
        with log_context(agent_id=agent_id):
            last_seq = await self._ingestor.resume(agent_id)
            # Presence is recorded last, once nothing else can fail: a refused socket leaves no trace.
            previous = await self._presence.connect(agent_id, sid, info, identity.fingerprint)
            self._agents[sid] = agent_id
            self._certs[sid] = identity.fingerprint
            if previous is not None:  # one socket per agent: the newest wins
                await self.close(previous, "superseded")
            log.info("agent %s connected (sid %s, last_seq %d)", agent_id, sid, last_seq)
            # hello must follow the CONNECT packet, which is sent after this handler returns.
            self.server.start_background_task(self._hello, sid, agent_id, last_seq)

    async def _hello(self, sid: str, agent_id: str, last_seq: int) -> None:
        if self._draining:  # admitted while `drain` was sending agents away: this one goes too
            await self._send_away(sid)
            return
        if self._presence.sid_of(agent_id) != sid:  # superseded before its CONNECT, when `close` could not
            await self.close(sid, "superseded")
            return
        reason = self._revoked.get(self._certs.get(sid, ""))
        if reason is not None:  # revoked while it was being admitted, when `revoke` could not close it
            await self._revoke_socket(sid, reason)
            return
        hello = {
            "agent_id": agent_id,
            "server_time": time.time(),
            "heartbeat_interval_s": self._settings.heartbeat_interval_s,
            "max_batch": self._settings.max_batch_events,
            "last_seq": last_seq,
        }
        await self.emit("hello", hello, to=sid)
        if sid in self._agents:  # still connected: its queued commands follow the hello
            self._greeted.add(sid)
            await self._commands.deliver_queued(agent_id)

    async def trigger_event(self, event: str, *args: Any) -> Any:
        # Every handler logs under its socket and agent (the first argument is always the sid).
        sid = args[0] if args and isinstance(args[0], str) else None
        with log_context(sid=sid, agent_id=self._agents.get(sid) if sid else None):
            return await self._dispatch(event, *args)

    async def _dispatch(self, event: str, *args: Any) -> Any:
        # Every event is answered: upstream acks an unknown one with nothing, and one with
        # extra arguments not at all (its handler's TypeError ends the task).
        if event in _RESERVED_EVENTS:
            return await super().trigger_event(event, *args)
        if not callable(getattr(self, f"on_{event}", None)):
            return error_ack(
                InvalidInput(f"unknown event {event[:64]!r}; agents send 'events' and 'heartbeat'")
            )
        if len(args) > 2:  # the sid, then the one payload every agent event has
            return error_ack(InvalidInput(f"{event!r} takes one argument, got {len(args) - 1}"))
        return await super().trigger_event(event, *args)

    async def on_events(self, sid: str, payload: Any = None) -> dict[str, Any]:
        # Checked first: a batch read before its socket was sent away may run after it left `_agents`.
        if self._draining:  # the agent keeps the batch and sends it again after reconnecting
            return error_ack(
                Unavailable("the hub is stopping; send this batch again after reconnecting",
                            retry_after_ms=self._settings.retry_after_ms)
            )  # fmt: skip
        agent_id = self._agents.get(sid)
        if agent_id is None:
            return error_ack(InvalidInput("this socket is not connected as an agent"))
        # python-socketio runs every message as its own task: bound what one socket can pile up.
        if self._in_flight.get(sid, 0) >= self._settings.max_batches_in_flight:
            return error_ack(
                Overloaded(
                    f"more than {self._settings.max_batches_in_flight} batches in flight on this socket "
                    "(max_batches_in_flight)",
                    retry_after_ms=self._settings.retry_after_ms,
                )
            )
        self._in_flight[sid] = self._in_flight.get(sid, 0) + 1
        self._batches += 1
        self._answered.clear()
        ingest = self._ingestor.ingest(agent_id, payload)
        try:
            return await _answer(
                ingest if self._ack_latency is None else aio.time(self._ack_latency, ingest),
                f"events from {agent_id}", "the hub failed to process this batch; retry it",
            )  # fmt: skip
        finally:
            self._batch_answered(sid)

    def _batch_answered(self, sid: str) -> None:
        if sid in self._in_flight:  # gone if the socket closed while its batch was committing
            self._in_flight[sid] -= 1
        self._batches -= 1
        if not self._batches:
            # python-socketio queues the ack packet in the same step as this handler returns (no
            # await between them suspends), so whoever this wakes finds every answer queued.
            self._answered.set()

    async def on_heartbeat(self, sid: str, payload: Any = None) -> dict[str, Any]:
        agent_id = self._agents.get(sid)
        if agent_id is None:
            return error_ack(InvalidInput("this socket is not connected as an agent"))
        try:
            beat = HEARTBEAT_ADAPTER.validate_python(payload)
        except ValidationError as exc:
            return error_ack(InvalidInput(f"invalid heartbeat: {exc.errors()[0]['msg']}"))
        return await _answer(
            self._presence.heartbeat(agent_id, sid, beat), f"heartbeat from {agent_id}",
            "the hub failed to record this heartbeat",
        )  # fmt: skip

    async def on_disconnect(self, sid: str, reason: str = "") -> None:
        agent_id = self._agents.pop(sid, None)
        self._in_flight.pop(sid, None)
        self._greeted.discard(sid)
        self._certs.pop(sid, None)
        why = self._closing.pop(sid, None) or _REASONS.get(reason, "transport_lost")
        if agent_id is not None:
            log.info("agent %s disconnected (%s)", agent_id, why)
            await self._presence.disconnect(agent_id, sid, why)

    async def close(self, sid: str, reason: PresenceReason) -> None:
        """Disconnect the socket `sid`, recording why."""
        self._closing[sid] = reason
        await self.disconnect(sid)

    async def drain(self) -> None:
        """Take no new agent or batch, answer the batches under way, then send every agent away.

        Bounded by `drain_timeout_s`: a batch still unanswered then is cut off with its socket
        and resent by its agent (the hub dedupes it if it was stored after all).
        """
        self._draining = True
        if self._batches:
            log.info("waiting for %d batches under way to be committed and acked", self._batches)
        try:
            async with asyncio.timeout(self._settings.drain_timeout_s):
                await self._answered.wait()
                # Scored and stored before the agents go: the node they move to reads that state.
                await self._ingestor.scored()
        except TimeoutError:
            log.warning(
                "%d batches unanswered after drain_timeout_s; their agents resend them", self._batches
            )
        if self._agents:
            log.info(
                "sending %d agents away: each reconnects within %.1fs",
                len(self._agents), self._settings.drain_reconnect_window_s,
            )  # fmt: skip
        await asyncio.gather(*(self._send_away(sid) for sid in list(self._agents)))

    async def _send_away(self, sid: str) -> None:
        # Each agent gets its own delay, so they do not all land on the remaining nodes at once.
        delay_s = random.uniform(0, self._settings.drain_reconnect_window_s)
        hint = {"reason": "draining", "after_ms": round(delay_s * 1000)}
        await self.emit("reconnect", hint, to=sid, ignore_queue=True)  # for this node's socket only
        eio_sid = self.server.manager.eio_sid_from_sid(sid, NAMESPACE)
        if eio_sid is not None:
            self._closing[sid] = "server_shutdown"
            await self.server.eio.drop(eio_sid)

    def holds_elsewhere(self, change: dict[str, Any]) -> bool:
        """Whether another node's presence `change` is a connection there of an agent connected here."""
        agent_id = change.get("agent_id")
        return (
            change.get("status") == "online"
            and change.get("reason") == "connected"
            and isinstance(agent_id, str)
            and self._presence.sid_of(agent_id) is not None
        )

    async def follow_remote(self, change: dict[str, Any]) -> None:
        """Close the socket here of an agent another node says connected to it (a hint: the store decides).

        Its old socket here went silent without closing (a network gone); heartbeats would
        end it only after `heartbeat_offline_after` intervals. The bus calls it only for the
        changes `holds_elsewhere` accepts.
        """
        sid = await self._presence.superseded(change["agent_id"])
        if sid is not None:
            log.info(
                "agent %s connected to node %s: closing its old socket here",
                change["agent_id"],
                change.get("node"),
            )
            await self.close(sid, "superseded")

    def agent_ids(self) -> list[str]:
        """The agents connected to this node now."""
        return list(set(self._agents.values()))

    async def revoke(self, fingerprint: str, reason: str) -> int:
        """Send `revoked` to every socket using certificate `fingerprint` and close it; return how many."""
        # A socket cannot be closed before its CONNECT packet is sent; `_hello` runs after that
        # packet and checks `_revoked`, so every socket is caught here or there.
        self._revoked[fingerprint] = reason
        connected = self.server.manager.is_connected
        sids = [sid for sid, used in self._certs.items() if used == fingerprint and connected(sid, NAMESPACE)]
        await asyncio.gather(*(self._revoke_socket(sid, reason) for sid in sids))
        return len(sids)

    async def _revoke_socket(self, sid: str, reason: str) -> None:
        log.warning("disconnecting agent %s: its certificate is revoked (%s)", self._agents.get(sid), reason)
        await self.emit("revoked", {"reason": reason}, to=sid)
        await self.close(sid, "revoked")

    def connection(self, agent_id: str) -> tuple[str, float] | None:
        """The agent's socket here that got its hello, as the store knows it: (node, connected_at)."""
        if self._presence.sid_of(agent_id) not in self._greeted:
            return None
        return self._presence.connection(agent_id)

    async def send_command(self, agent_id: str, message: CommandMessage, on_ack: AckHandler) -> bool:
        """Emit `command` to the agent's socket with `on_ack` for its ack; False if it has none here."""
        sid = self._presence.sid_of(agent_id)
        if sid not in self._greeted:
            return False
        await self.emit("command", message, to=sid, callback=on_ack)
        return True


class AgentServer(socketio.AsyncServer):  # type: ignore[misc]  # socketio ships no types
    """python-socketio's server, closing a socket that breaks the Socket.IO protocol.

    Upstream logs a packet it cannot decode or dispatch and carries on: its sender waits for
    an ack forever, a half-received binary packet swallows every later message or piles up
    any number of attachments, and a client may emit the reserved `connect` and `disconnect`
    events. The reference (JavaScript) server closes such a connection; so does this one.

    Only the namespace connect checks the certificate (a missing one is answered `cert_missing`
    there), so until then anyone who reaches the port holds a socket, 70 KiB of the hub's memory
    each. Such a connection is closed if it has not joined a namespace within
    `connect_timeout_s`, like the reference server's `connectTimeout`, and one address may have
    at most `max_connecting_per_address` of them at once: the next is refused with 429.
    """

    def __init__(
        self,
        *args: Any,
        connect_timeout_s: float,
        max_connecting_per_address: int,
        trusted_proxies: Sequence[ProxyAddress],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, refuse=self._refuse, **kwargs)  # `refuse` is for _EngineServer
        self._connect_timeout_s = connect_timeout_s
        self._max_connecting = max_connecting_per_address
        self._trusted_proxies = trusted_proxies
        self._connecting: dict[str, str] = {}  # Engine.IO sid -> address, until it joins or closes
        self._connecting_from: Counter[str] = Counter()

    def _refuse(self, environ: dict[str, Any]) -> None:
        """Raise RateLimited if the new connection's address has too many that have not joined."""
        address = client_address(environ["aiohttp.request"], self._trusted_proxies) or "unknown"
        environ[_ADDRESS] = address
        if self._connecting_from[address] >= self._max_connecting:
            raise RateLimited(
                f"{address} has {self._max_connecting} connections that have not joined /agent yet "
                "(max_connecting_per_address)",
                retry_after_s=1,
            )

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        address = environ[_ADDRESS]
        self._connecting[eio_sid] = address
        self._connecting_from[address] += 1
        asyncio.get_running_loop().call_later(self._connect_timeout_s, self._close_unless_joined, eio_sid)

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        if self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is not None:  # admitted
            self._joined(eio_sid)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        self._joined(eio_sid)  # or never will
        await super()._handle_eio_disconnect(eio_sid, reason)

    def _joined(self, eio_sid: str) -> None:
        address = self._connecting.pop(eio_sid, None)
        if address is not None:
            self._connecting_from[address] -= 1
            if not self._connecting_from[address]:
                del self._connecting_from[address]

    def _close_unless_joined(self, eio_sid: str) -> None:
        if eio_sid not in self._connecting or eio_sid not in self.eio.sockets:
            return
        log.info("closing socket %s: it joined no namespace in %.0f s", eio_sid, self._connect_timeout_s)
        self.start_background_task(self.eio.disconnect, eio_sid)

    async def _handle_eio_message(self, eio_sid: str, data: str | bytes) -> None:
        if eio_sid not in self.eio.sockets:  # closed already: frames still in flight are dropped
            return
        try:
            _check_attachment(self._binary_packet.get(eio_sid), data, self.eio.max_http_buffer_size)
            await super()._handle_eio_message(eio_sid, data)
            _check_announced(self._binary_packet.get(eio_sid))
        except Exception as error:  # whatever upstream could not handle: the packet is broken
            await self._close_broken(eio_sid, error)

    async def _handle_event(self, eio_sid: str, namespace: str | None, ack_id: int | None, data: Any) -> None:
        if not (isinstance(data, list) and data and isinstance(data[0], str)) or data[0] in _RESERVED_EVENTS:
            raise ValueError("an event must be a list [name, *args] whose name is not reserved")
        await super()._handle_event(eio_sid, namespace, ack_id, data)

    async def _close_broken(self, eio_sid: str, error: Exception) -> None:
        self._binary_packet.pop(eio_sid, None)
        log.warning("closing socket %s: it broke the Socket.IO protocol (%.200s)", eio_sid, error)
        await self.eio.disconnect(eio_sid)

    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return _EngineServer


class _EngineServer(engineio.AsyncServer):  # type: ignore[misc]  # engineio ships no types
    """python-engineio's server, closing a socket without waiting for its client."""

    _async: dict[str, Any]  # engineio's table of its async driver's parts

    def __init__(self, *args: Any, refuse: Callable[[dict[str, Any]], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refuse = refuse  # raises to refuse a new connection (AgentServer._refuse)
        # The table is the driver module's own: copied, so the change stays with this server.
        self._async = {
            **self._async, "websocket": _ClosableWebSocket, "translate_request": _translate_request,
        }  # fmt: skip

    async def _handle_connect(self, environ: dict[str, Any], transport: str, jsonp_index: Any = None) -> Any:
        self._refuse(environ)  # the problem middleware answers what it raises
        return await super()._handle_connect(environ, transport, jsonp_index)

    def create_queue(self, *args: Any, **kwargs: Any) -> PacketQueue:
        # Each socket's outgoing packets (engineio's hook; its sockets are the only callers).
        return PacketQueue()

    async def disconnect(self, sid: str | None = None) -> None:
        socket = self.sockets.get(sid) if sid is not None else None
        if socket is None:
            await super().disconnect(sid)
            return
        # Upstream waits until the client takes the CLOSE packet: a long-polling client that
        # never polls again (one that sent an over-limit body, say) holds the request forever.
        await socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)
        self.sockets.pop(sid, None)
        # After CLOSE, the end of the queue: the WebSocket writer then closes the connection
        # rather than waiting for the client to, which a hostile one never does.
        socket.queue.put_nowait(None)

    async def drop(self, sid: str) -> None:
        """Close the connection of socket `sid` as a lost network would: without a CLOSE packet.

        Stock Socket.IO clients then reconnect by themselves. python-socketio's client does
        not after the server's Socket.IO DISCONNECT or its Engine.IO CLOSE packet: it answers
        both with its own `disconnect()`, which leaves the Engine.IO state `disconnecting`, and
        it reconnects only from `connected`. The JavaScript client does not after a DISCONNECT
        either ("io server disconnect").
        """
        # Out of `sockets` first: an answer produced while the disconnect handlers run (they
        # await the store) is not sent; its agent resends the batch after reconnecting.
        socket = self.sockets.pop(sid, None)
        if socket is None:
            return
        await socket.close(wait=False, abort=True, reason=self.reason.SERVER_DISCONNECT)
        # The writer sends what is queued (acks, then the reconnect hint), then closes the WebSocket.
        socket.queue.put_nowait(None)


class _ClosableWebSocket(aiohttp_driver.WebSocket):  # type: ignore[misc]  # engineio ships no types
    """python-engineio's aiohttp WebSocket, never compressed, telling a close by None, not an exception.

    Upstream accepts per-message compression whenever a client offers it, as browsers and the
    JavaScript client do: each such socket then holds zlib state, 175 KiB of hub memory a socket
    where 70 KiB does otherwise, and every frame costs compression time on the hub's core.

    Upstream raises OSError when the connection closes, and the task that reads the socket keeps
    it: the error's traceback holds the frames holding that task, a reference cycle around every
    closed connection's TLS state and buffers that only a full collection frees (tens of KB per
    reconnect, and full collections stall the hub for as long as they take). On None, Engine.IO
    ends the socket the same way.

    A close frame with a normal code reads as Engine.IO's CLOSE packet, so a client that closed
    on purpose is told from a lost connection (`clean_disconnect`, not `transport_lost`). A text
    frame that is no Engine.IO packet ends the socket, quietly.
    """

    async def __call__(self, environ: dict[str, Any]) -> web.WebSocketResponse:
        self._sock = web.WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=False)
        await self._sock.prepare(environ["aiohttp.request"])
        self.environ = environ
        await self.handler(self)
        return self._sock

    async def wait(self) -> str | bytes | None:
        message = await self._sock.receive()
        if message.type is WSMsgType.CLOSE and message.data in _CLEAN_CLOSE_CODES:
            # The client closed on purpose. Engine.IO hears it as the CLOSE packet such a client
            # means to send: python-socketio's client closes the WebSocket before its queued
            # DISCONNECT and CLOSE packets go out, which otherwise reads as a lost transport.
            return _ENGINEIO_CLOSE
        if isinstance(message.data, str) and message.data[:1] not in _ENGINEIO_TYPES:
            # Not an Engine.IO packet. Upstream would log a traceback for it (an unknown type), or
            # raise out of the request handler and write an HTTP error into the WebSocket.
            log.info("closing a socket: a %d-character text frame is no Engine.IO packet", len(message.data))
            return None
        return message.data if isinstance(message.data, str | bytes) else None


def _translate_request(request: web.Request) -> dict[str, Any]:
    """Build upstream's environ for `request`, with a long-polling POST's body checked as it is read."""
    environ: dict[str, Any] = aiohttp_driver.translate_request(request)
    if request.method == "POST":  # only these read a body; a WebSocket keeps its environ for its life
        environ["wsgi.input"] = _CheckedPayload(environ["wsgi.input"])
    return environ


class _MalformedPayload(engineio.exceptions.EngineIOError):  # type: ignore[misc]  # engineio ships no types
    """A long-polling POST's body that is no payload of Engine.IO packets."""


class _CheckedPayload:
    """A long-polling POST's body, refused unless it holds what clients post: PONG, MESSAGE, CLOSE last.

    Upstream logs a traceback, and answers 200, for a body it cannot decode or a packet type it does
    not know. Another packet type, or a packet after CLOSE, fails upstream with a 500 (logged) once an
    earlier packet in the body has ended the session. Refused here with one of upstream's own errors,
    the body closes the session and is answered 400.
    """

    def __init__(self, content: Any) -> None:
        self._content = content

    async def read(self, length: int) -> bytes:
        body: bytes = await self._content.read(length)
        try:
            packets = engineio.payload.Payload(encoded_payload=body.decode()).packets
        except (UnicodeDecodeError, ValueError, IndexError) as error:  # binascii.Error is a ValueError
            log.info("refusing a long-polling body: %.200s", error)
            raise _MalformedPayload from None
        kinds = [packet.packet_type for packet in packets]
        if not _POSTED_TYPES.issuperset(kinds) or engineio.packet.CLOSE in kinds[:-1]:
            log.info("refusing a long-polling body of packet types %s", kinds[:16])
            raise _MalformedPayload
        return body


class PacketQueue:
    """An unbounded FIFO of one socket's outgoing packets: the part of asyncio.Queue engineio uses.

    asyncio.Queue allocates four deques up front (items, getters, putters, and its join
    Event's waiters): about 3 KB on every idle agent socket. Here the items are a list read
    from `_head` on, and waiters exist only while someone waits.
    """

    __slots__ = ("_getters", "_head", "_items", "_joiners", "_unfinished")

    def __init__(self) -> None:
        self._items: list[Any] = []  # never holds an item while a getter waits
        self._head = 0  # items before it were taken; the list is emptied once all are
        self._unfinished = 0  # items put and not yet marked done (`task_done`)
        self._getters: list[asyncio.Future[Any]] | None = None
        self._joiners: list[asyncio.Future[Any]] | None = None

    def qsize(self) -> int:
        return len(self._items) - self._head

    def empty(self) -> bool:
        return not self.qsize()

    def put_nowait(self, item: Any) -> None:
        self._unfinished += 1
        getter, self._getters = _first_waiting(self._getters)
        if getter is not None:  # handed over: a getter that timed out or was cancelled is skipped
            getter.set_result(item)
        else:
            self._items.append(item)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self.qsize():
            raise asyncio.QueueEmpty
        item = self._items[self._head]
        self._head += 1
        if self._head == len(self._items):
            self._items, self._head = [], 0  # frees what a burst grew
        return item

    def get(self) -> asyncio.Future[Any]:
        """Return a future of the next item.

        A future rather than a coroutine: engineio awaits it under `asyncio.wait_for`, which
        would wrap a coroutine in a task of its own for every socket. If that wait times out,
        the future is cancelled and a later item goes to the next getter or into the list.
        An item handed over as the timeout fires is still returned by Python 3.11's `wait_for`;
        3.12's, built on `asyncio.timeout`, would drop it (engineio then closes the socket).
        """
        future = asyncio.get_running_loop().create_future()
        if self.qsize():
            future.set_result(self.get_nowait())
        else:
            self._getters = [*(self._getters or ()), future]
        return future

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        while not self._unfinished and self._joiners:
            joiner, self._joiners = _first_waiting(self._joiners)
            if joiner is not None:
                joiner.set_result(None)

    async def join(self) -> None:
        if self._unfinished:
            joiner = asyncio.get_running_loop().create_future()
            self._joiners = [*(self._joiners or ()), joiner]
            await joiner


def _first_waiting(
    waiters: list[asyncio.Future[Any]] | None,
) -> tuple[asyncio.Future[Any] | None, list[asyncio.Future[Any]] | None]:
    """Take the first of `waiters` not cancelled yet; return it and those left (None for none)."""
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            return waiter, waiters or None
    return None, None


def _check_attachment(pending: Any, data: str | bytes, limit: int) -> None:
    """Refuse what cannot be the next attachment of the binary packet `pending` (if any)."""
    if pending is None:
        return
    if not isinstance(data, bytes):
        raise ValueError("a text packet arrived where a binary attachment was due")
    if sum(map(len, pending.attachments)) + len(data) > limit:
        raise ValueError(f"binary attachments over {limit} bytes (max_frame_bytes)")


def _check_announced(pending: Any) -> None:
    """Refuse a binary packet that announces no attachment, or more than an agent sends."""
    if pending is None or pending.attachments:
        return
    if not 0 < pending.attachment_count <= _MAX_ATTACHMENTS:
        raise ValueError(f"a binary packet announcing {pending.attachment_count} attachments")


def _refusal(code: str, message: str) -> socketio.exceptions.ConnectionRefusedError:
    """Build the refusal python-socketio sends as `connect_error` with PROTOCOL.md's code."""
    return socketio.exceptions.ConnectionRefusedError(message, {"code": code, "message": message})


async def _answer(call: Awaitable[Mapping[str, Any]], what: str, failure: str) -> dict[str, Any]:
    """Turn a service call into its ack: every call is answered, or the agent waits for nothing."""
    try:
        return dict(await call)
    except HubError as error:
        return error_ack(error)
    except Exception:
        log.exception("%s failed", what)
        return error_ack(InternalError(failure))
