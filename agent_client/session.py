"""The agent's Socket.IO session with the hub: connect, resume, send, heartbeat, obey."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from os import PathLike
from typing import Any, Final

import aiohttp
import socketio

from agent_client import __version__
from agent_client.collectors import host_stats
from agent_client.commands import execute
from agent_client.spool import Spool
from agent_client.tls import CertificateError, Diagnosis, check_validity, client_context, diagnose
from agent_client.wire import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_BYTES,
    FATAL_CONNECT_CODES,
    NAMESPACE,
    PERMANENT_CODES,
    Encoding,
    Event,
    HubRefusalError,
    encode_batch,
    event_size,
)
from hub.codec import SocketJson

log = logging.getLogger("agent_client.session")
# python-socketio logs every packet at INFO; keep that for --debug
SOCKETIO_LOG: Final = logging.getLogger("agent_client.socketio")
ENGINEIO_LOG: Final = logging.getLogger("agent_client.engineio")
# and engineio warns about ordinary closes; the session logs what matters in its own words
for _lib_log, _level in ((SOCKETIO_LOG, logging.WARNING), (ENGINEIO_LOG, logging.ERROR)):
    if _lib_log.level == logging.NOTSET:
        _lib_log.setLevel(_level)

DEFAULT_HEARTBEAT_S: Final = 15.0
_PUMP_CHUNK: Final = 1000
_SOURCE_BUFFER: Final = 2_000  # events read ahead of the spool; bounds memory at the size caps
_MAX_RETRY_AFTER_S: Final = 60.0
_STABLE_SESSION_S: Final = 60.0  # a session this long resets the reconnect backoff
_MAX_RECONNECT_AFTER_S: Final = 300.0  # the longest a hub's `reconnect` hint may park the agent


@dataclass
class _Batch:
    low: int
    high: int
    task: asyncio.Task[None]


class AgentSession:
    """One agent's connection to the hub, fed from a spool that an event source fills."""

    def __init__(
        self,
        hub_url: str,
        cert: str | PathLike[str] | None,
        key: str | PathLike[str] | None,
        ca: str | PathLike[str] | None,
        spool: Spool | str | PathLike[str],
        *,
        encoding: Encoding = "json",
        inflight: int = 4,
        hostname: str | None = None,
        call_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        reconnection_delay: float = 1.0,
        reconnection_delay_max: float = 30.0,
        randomization_factor: float = 0.5,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError("encoding must be 'json' or 'msgpack'")
        if inflight < 1:
            raise ValueError("inflight must be at least 1")
        self.hub_url = hub_url
        self.encoding: Encoding = encoding
        self.inflight = inflight
        self.hostname = hostname or socket.gethostname()
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.reconnection_delay = reconnection_delay
        self.reconnection_delay_max = reconnection_delay_max
        self.randomization_factor = randomization_factor
        self.max_batch_bytes = max_batch_bytes
        # without a certificate only a hub in its development mode will talk to us
        self._ssl = client_context(cert, key, ca) if cert and key and ca else None
        self._cert = cert
        if cert:
            check_validity(cert)
        self._owns_spool = not isinstance(spool, Spool)
        self.spool = spool if isinstance(spool, Spool) else Spool(spool)

        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_S
        self.max_batch = DEFAULT_MAX_BATCH
        self._last_hello: dict[str, Any] | None = None
        self._client: socketio.AsyncClient | None = None
        self._emit_lock = asyncio.Lock()
        self._streams: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._namespace_up = asyncio.Event()
        self._new_data = asyncio.Event()
        self._heartbeat_now = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._finished = asyncio.Event()
        self._drained = asyncio.Event()
        self._source_done = False
        self._running = False
        self._diagnosing = False
        self._refusal: HubRefusalError | None = None
        self._failure: BaseException | None = None
        self._reconnect_at: float | None = None  # monotonic time a draining hub said to come back

    @property
    def last_hello(self) -> dict[str, Any] | None:
        """The most recent `hello` from the hub, or None before the first."""
        return self._last_hello

    @property
    def acked_seq(self) -> int:
        """The highest seq up to which the hub has confirmed every event."""
        return self.spool.acked_through()

    @property
    def connected(self) -> bool:
        """Whether the `/agent` namespace is connected now."""
        return self._namespace_up.is_set()

    @property
    def refusal(self) -> HubRefusalError | None:
        """Why the hub turned this agent away for good, if it did."""
        return self._refusal

    async def run(self, source: AsyncIterator[Event] | None = None) -> None:
        """Spool `source`, keep a session with the hub and send until `stop()`.

        Raises HubRefusalError when the hub revokes or refuses the agent for good, and
        whatever made the source or the spool fail.
        """
        if self._running or self._finished.is_set():
            raise RuntimeError("a session runs once; make a new one")
        self._running = True
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        http = aiohttp.ClientSession(connector=connector)
        self._client = self._new_client(http)
        self._source_done = source is None
        self._check_drained()
        try:
            self._spawn(self._tasks, self._stay_connected())
            if source is not None:
                self._spawn(self._tasks, self._pump(source))
            await self._stop_requested.wait()
        finally:
            await self._shutdown(http)
        if self._refusal is not None:
            raise self._refusal
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        """End the session cleanly and wait until `run()` has returned."""
        self._stop_requested.set()
        if self._running:
            await self._finished.wait()

    async def wait_drained(self) -> None:
        """Wait until the source is exhausted and the hub has every spooled event."""
        await self._drained.wait()

    def status(self) -> dict[str, Any]:
        """Return the agent's state for the `status` command."""
        return {
            "version": __version__,
            "hostname": self.hostname,
            "spool_depth": self.spool.depth(),
            "dropped": self.spool.dropped(),
            "acked_seq": self.acked_seq,
            "next_seq": self.spool.next_seq(),
            "encoding": self.encoding,
        }

    def flush(self) -> int:
        """Wake the sender and return how many events are spooled."""
        self._new_data.set()
        return self.spool.depth()

    # --- connection ---------------------------------------------------------------------

    def _new_client(self, http: aiohttp.ClientSession) -> socketio.AsyncClient:
        client = socketio.AsyncClient(
            reconnection=True,
            reconnection_delay=self.reconnection_delay,
            reconnection_delay_max=self.reconnection_delay_max,
            randomization_factor=self.randomization_factor,
            logger=SOCKETIO_LOG,
            engineio_logger=ENGINEIO_LOG,
            handle_sigint=False,
            http_session=http,
            json=SocketJson,  # orjson, as event_size() estimates; stdlib json escapes non-ASCII
        )
        handlers = {
            "connect": self._on_connect,
            "connect_error": self._on_connect_error,
            "disconnect": self._on_disconnect,
            "hello": self._on_hello,
            "config": self._on_config,
            "revoked": self._on_revoked,
            "reconnect": self._on_reconnect,
            "command": self._on_command,
        }
        for event, handler in handlers.items():
            client.on(event, handler, namespace=NAMESPACE)
        return client

    async def _stay_connected(self) -> None:
        client = self._require_client()
        short_sessions = 0
        while not self._stop_requested.is_set():
            await self._connect()
            if self._stop_requested.is_set():
                return
            connected_at = time.monotonic()
            # returns once the connection is over and the library gave up reconnecting,
            # which it does when the hub (not the network) ended the session
            await client.wait()
            if not self._stop_requested.is_set():
                # A hub ending many sessions at once (shutdown, two agents sharing a
                # certificate) must not get every agent back at the same instant.
                stable = time.monotonic() - connected_at >= _STABLE_SESSION_S
                short_sessions = 0 if stable else short_sessions + 1
                delay = self._backoff(short_sessions)
                if self._reconnect_at is not None:  # the hub chose this agent's moment itself
                    delay = max(0.0, self._reconnect_at - time.monotonic())
                    self._reconnect_at = None
                    client.reconnection = True
                log.info("the hub ended the session; connecting again in %.1fs", delay)
                await self._settle(client)
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Return the wait before reconnect `attempt` (0 first): capped, doubling, jittered."""
        base: float = min(self.reconnection_delay * 2.0**attempt, self.reconnection_delay_max)
        return base * (1 + self.randomization_factor * (2 * random.random() - 1))

    async def _settle(self, client: socketio.AsyncClient) -> None:
        """Wait for the library to finish closing; it refuses to connect until then."""
        for _ in range(100):
            if client.eio.state == "disconnected":
                return
            await asyncio.sleep(0.05)
        await client.eio.disconnect(abort=True)

    async def _connect(self) -> None:
        client = self._require_client()
        attempt = 0
        while not self._stop_requested.is_set():
            try:
                await client.connect(
                    self.hub_url,
                    auth=self._auth(),
                    transports=["websocket"],
                    namespaces=[NAMESPACE],
                    wait_timeout=self.connect_timeout,
                    retry=True,
                )
            except socketio.exceptions.ConnectionError as exc:
                if self._stop_requested.is_set():
                    return
                delay = self._backoff(attempt)
                attempt += 1
                log.warning("cannot connect to %s (%s); retrying in %.1fs", self.hub_url, exc, delay)
                await asyncio.sleep(delay)
            else:
                return

    def _auth(self) -> dict[str, str]:
        return {
            "agent_version": __version__,
            "hostname": self.hostname,
            "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
        }

    async def _on_connect(self) -> None:
        log.info("connected to %s", self.hub_url)
        self._namespace_up.set()

    async def _on_connect_error(self, data: Any = None) -> None:
        if not isinstance(data, dict):  # the transport failed: no hub verdict to read
            log.warning("cannot connect to %s: %s", self.hub_url, data or "connection failed")
            self._start_diagnosis()
            return
        code, message = _refusal_details(data)
        if code in FATAL_CONNECT_CODES:
            log.error("the hub refused this agent (%s): %s; giving up", code, message)
            self._give_up(HubRefusalError(code, message))
        else:
            log.warning("the hub refused the connection (%s): %s; will retry", code, message)

    async def _on_disconnect(self, reason: Any = None) -> None:
        self._namespace_up.clear()
        self._cancel_streams()
        if not self._stop_requested.is_set():
            if self._reconnect_at is not None:  # expected: the hub said it is draining
                log.info("disconnected from %s, which is draining", self.hub_url)
            else:
                log.warning("disconnected from %s (%s)", self.hub_url, reason or "no reason given")
            return
        log.info("disconnecting from %s", self.hub_url)
        if reason != socketio.AsyncClient.reason.CLIENT_DISCONNECT:
            return  # the hub or the network ended it: nothing of ours to flush
        client = self._require_client()
        # The library calls this handler while iterating `client.namespaces`; a DISCONNECT
        # from the hub arriving during our wait below deletes from that dict. Give the
        # library a copy to delete from, so its iteration stays valid.
        client.namespaces = dict(client.namespaces)
        # python-socketio closes the WebSocket right after this handler returns, before its
        # writer has sent the DISCONNECT packet; let it flush so the hub sees a clean goodbye.
        # (Not queue.join(): the library leaves tasks undone after a broken connection.)
        queue = client.eio.queue
        for _ in range(200):
            if queue.empty():
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    async def _on_revoked(self, data: Any = None) -> None:
        # Not the verdict itself: the hub closes the socket next, and the reconnect that follows
        # is refused `cert_revoked`, which ends the agent. A `revoked` message alone (one forged
        # by whoever can write to the hubs' Redis, say) must not silence it for good.
        reason = data.get("reason") if isinstance(data, dict) else None
        log.error("the hub says this agent's certificate is revoked (%s); the next connect will tell", reason)

    async def _on_reconnect(self, data: Any = None) -> None:
        # A draining hub closes the socket right after this hint. The library would reconnect on
        # its own schedule; switched off, it lets `_stay_connected` wait for the hub's instead.
        # The URL stays the same: behind a proxy, the next connection lands on a remaining node.
        after_ms = data.get("after_ms") if isinstance(data, dict) else None
        if not isinstance(after_ms, int | float) or isinstance(after_ms, bool) or after_ms < 0:
            log.error("ignoring a malformed reconnect hint from the hub: %r", data)
            return
        delay = min(after_ms / 1000, _MAX_RECONNECT_AFTER_S)
        log.info("the hub asks to reconnect in %.1fs (%s)", delay, data.get("reason") or "no reason given")
        self._reconnect_at = time.monotonic() + delay
        self._require_client().reconnection = False

    def _give_up(self, refusal: HubRefusalError) -> None:
        self._refusal = refusal
        self._require_client().reconnection = False
        self._stop_requested.set()

    def _start_diagnosis(self) -> None:
        if self._ssl is None or self._diagnosing:
            return
        self._diagnosing = True
        self._spawn(self._tasks, self._diagnose())

    async def _diagnose(self) -> None:
        assert self._ssl is not None
        assert self._cert is not None
        try:
            check_validity(self._cert)
            found = await diagnose(self.hub_url, self._ssl)
        except CertificateError as exc:  # expired while running: no hub will take it
            found = Diagnosis("cert_expired", str(exc))
        finally:
            self._diagnosing = False
        if found is None:
            return
        if found.code in FATAL_CONNECT_CODES:
            log.error("%s (%s); giving up", found.message, found.code)
            self._give_up(HubRefusalError(found.code, found.message))
        else:
            log.warning("cannot connect to %s: %s", self.hub_url, found.message)

    async def _shutdown(self, http: aiohttp.ClientSession) -> None:
        self._stop_requested.set()
        client = self._require_client()
        client.reconnection = False
        try:
            self._cancel_streams()
            # disconnect before cancelling the connection task: cancelling its wait on the
            # library's read loop would drop the socket without a clean DISCONNECT
            with contextlib.suppress(Exception):
                await client.shutdown()
            await _cancel_all(self._tasks | self._streams)
            if client.eio.state != "disconnected":
                with contextlib.suppress(Exception):
                    await client.eio.disconnect(abort=True)
            await http.close()
            if self._owns_spool:
                await asyncio.to_thread(self.spool.close)
        finally:
            self._namespace_up.clear()
            self._running = False
            self._finished.set()

    # --- hub events ---------------------------------------------------------------------

    async def _on_hello(self, data: Any = None) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("last_seq"), int):
            log.error("ignoring a malformed hello from the hub: %r", data)
            return
        self._last_hello = data
        self._adopt(data)
        log.info(
            "hello from the hub: agent_id=%s last_seq=%d heartbeat=%.1fs max_batch=%d",
            data.get("agent_id"),
            data["last_seq"],
            self.heartbeat_interval_s,
            self.max_batch,
        )
        self._cancel_streams()
        self._spawn(self._streams, self._send(data["last_seq"]))
        self._spawn(self._streams, self._heartbeat())

    async def _on_config(self, data: Any = None) -> None:
        if not isinstance(data, dict):
            log.error("ignoring a malformed config from the hub: %r", data)
            return
        self._adopt(data)
        log.info("new config: heartbeat=%.1fs max_batch=%d", self.heartbeat_interval_s, self.max_batch)
        self._heartbeat_now.set()

    async def _on_command(self, data: Any = None) -> dict[str, Any]:
        return await execute(self, data)

    def _adopt(self, data: dict[str, Any]) -> None:
        interval = data.get("heartbeat_interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            self.heartbeat_interval_s = float(interval)
        max_batch = data.get("max_batch")
        if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch > 0:
            self.max_batch = max_batch

    # --- sending ------------------------------------------------------------------------

    async def _send(self, last_seq: int) -> None:
        await self._namespace_up.wait()
        await self._resume(last_seq)
        while True:
            try:
                await self._send_window()
            except TimeoutError:
                # the socket looks alive but an ack never came; the hub dedupes, so resend
                log.warning(
                    "no ack within %.0fs; resending from seq %d",
                    self.call_timeout,
                    self.acked_seq + 1,
                )
                await asyncio.sleep(1.0)
            except socketio.exceptions.SocketIOError as exc:
                log.info("sending paused until the next hello: %s", exc)
                return

    async def _resume(self, last_seq: int) -> None:
        await asyncio.to_thread(self.spool.resume, last_seq)
        self._check_drained()

    async def _send_window(self) -> None:
        window: deque[_Batch] = deque()
        after = self.acked_seq
        try:
            while True:
                self._new_data.clear()
                after = await self._fill(window, after)
                if window and window[0].task.done():
                    await self._retire(window)
                    continue
                await self._wait_for_progress(window)
        finally:
            for batch in window:
                _discard(batch.task)

    async def _fill(self, window: deque[_Batch], after: int) -> int:
        while len(window) < self.inflight:
            events = await asyncio.to_thread(self._read_batch, after)
            if not events:
                break
            low, after = events[0]["seq"], events[-1]["seq"]
            window.append(_Batch(low, after, asyncio.create_task(self._deliver(events))))
        return after

    def _read_batch(self, after: int) -> list[Event]:
        events = self.spool.pending(after, self.max_batch)
        size = 0
        for index, event in enumerate(events):
            size += event_size(event)
            if size > self.max_batch_bytes and index > 0:
                return events[:index]
        return events

    async def _retire(self, window: deque[_Batch]) -> None:
        high = self.acked_seq
        while window and window[0].task.done():
            batch = window.popleft()
            batch.task.result()  # a timeout or disconnect ends this window here
            high = batch.high
        # Only a prefix of finished batches is retired, so a gap is never acked over. The spool
        # keeps the acked prefix: a new hello may cancel this task while the write still lands.
        await asyncio.to_thread(self.spool.ack_through, high)
        self._check_drained()

    async def _wait_for_progress(self, window: deque[_Batch]) -> None:
        waiters: set[asyncio.Future[Any]] = {batch.task for batch in window}
        wake = None
        if len(window) < self.inflight:
            wake = asyncio.ensure_future(self._new_data.wait())
            waiters.add(wake)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if wake is not None:
                wake.cancel()

    async def _deliver(self, events: list[Event]) -> None:
        payload = encode_batch(events, self.encoding)
        low, high = events[0]["seq"], events[-1]["seq"]
        while True:
            ack = await self._call("events", payload)
            error = ack.get("error") if isinstance(ack, dict) else {"code": "bad_ack", "message": repr(ack)}
            if not error:
                _log_rejections(ack, low, high)
                return
            code = error.get("code") if isinstance(error, dict) else None
            if code == "batch_too_large" and len(events) > 1:
                # The hub measures differently than our estimate: send the halves instead.
                middle = len(events) // 2
                await self._deliver(events[:middle])
                await self._deliver(events[middle:])
                return
            if code in PERMANENT_CODES:
                log.error("hub refused the batch seq %d-%d for good (%r); dropping it", low, high, error)
                return
            # unavailable, overloaded, internal, or an answer we do not understand: the hub
            # may recover, and dropping would lose events it never stored. Keep and retry.
            delay = _retry_after(error) if isinstance(error, dict) else 1.0
            log.info("hub answered %s for seq %d-%d; retrying in %.2fs", code, low, high, delay)
            await asyncio.sleep(delay)

    async def _call(self, event: str, data: Any, wait_s: float | None = None) -> Any:
        client = self._require_client()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_ack(*args: Any) -> None:
            if not answer.done():
                answer.set_result(args[0] if len(args) == 1 else list(args) or None)

        # a binary payload is several Engine.IO packets; they must not interleave
        async with self._emit_lock:
            await client.emit(event, data, namespace=NAMESPACE, callback=on_ack)
        return await asyncio.wait_for(answer, wait_s or self.call_timeout)

    # --- heartbeat ----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        await self._namespace_up.wait()
        while True:
            wait = await self._send_heartbeat()
            self._heartbeat_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heartbeat_now.wait(), wait)

    async def _send_heartbeat(self) -> float:
        payload = {
            "ts": time.time(),
            **await asyncio.to_thread(host_stats),
            "spool_depth": self.spool.depth(),
            "dropped": self.spool.dropped(),
        }
        interval = self.heartbeat_interval_s
        try:
            ack = await self._call("heartbeat", payload, wait_s=min(self.call_timeout, interval))
        except TimeoutError:
            log.warning("the hub did not answer a heartbeat within %.1fs", interval)
            return interval
        except socketio.exceptions.SocketIOError:
            return interval
        log.debug("heartbeat acked: %r", ack)
        next_in = ack.get("next_in_s") if isinstance(ack, dict) else None
        if isinstance(next_in, int | float) and not isinstance(next_in, bool) and next_in > 0:
            return float(next_in)
        return interval

    # --- source -------------------------------------------------------------------------

    async def _pump(self, source: AsyncIterator[Event]) -> None:
        buffer: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=_SOURCE_BUFFER)
        reader = asyncio.create_task(_read_source(source, buffer))
        try:
            while True:
                chunk = await _take(buffer, _PUMP_CHUNK)
                events = [event for event in chunk if event is not None]
                if events:
                    self._drained.clear()
                    await asyncio.to_thread(self.spool.append, events)
                    self._new_data.set()
                if chunk[-1] is None:
                    break
            await reader  # raises whatever ended the source
            log.info("the event source is exhausted")
            self._source_done = True
            self._check_drained()
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            elif not reader.cancelled():
                reader.exception()  # already raised above, or lost to our own cancellation
            # A stop keeps what the source already handed over: spool it, it is sent next run.
            leftover = [event for event in _take_ready(buffer) if event is not None]
            if leftover:
                await asyncio.to_thread(self.spool.append, leftover)

    def _check_drained(self) -> None:
        if self._source_done and self.spool.depth() == 0:
            self._drained.set()

    # --- tasks --------------------------------------------------------------------------

    def _spawn(self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._streams.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("agent task failed: %s", exc, exc_info=exc)
        if self._failure is None:
            self._failure = exc
        self._stop_requested.set()

    def _cancel_streams(self) -> None:
        for task in self._streams:
            task.cancel()

    def _require_client(self) -> socketio.AsyncClient:
        if self._client is None:
            raise RuntimeError("the session is not running")
        return self._client


async def _read_source(source: AsyncIterator[Event], buffer: asyncio.Queue[Event | None]) -> None:
    cancelled = False
    try:
        async for event in source:
            await buffer.put(event)
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        # A source that ended or failed marks the end for the pump (which keeps taking, so
        # this put gets room); a cancelled reader must not wait on a buffer nobody drains.
        if not cancelled:
            await buffer.put(None)


async def _take(buffer: asyncio.Queue[Event | None], limit: int) -> list[Event | None]:
    """Wait for one item, then take whatever else is ready, up to `limit`."""
    items = [await buffer.get()]
    while len(items) < limit and items[-1] is not None and not buffer.empty():
        items.append(buffer.get_nowait())
    return items


def _take_ready(buffer: asyncio.Queue[Event | None]) -> list[Event | None]:
    items: list[Event | None] = []
    while not buffer.empty():
        items.append(buffer.get_nowait())
    return items


def _discard(task: asyncio.Task[None]) -> None:
    """Cancel a task, or collect its outcome so an exception is not reported as lost."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _refusal_details(data: dict[str, Any]) -> tuple[str, str]:
    """Return (code, message) of a hub's connect refusal."""
    # python-socketio delivers {"message": sentence, "data": {"code", "message"}}
    nested = data.get("data")
    inner: dict[str, Any] = nested if isinstance(nested, dict) else data
    code = inner.get("code") or "refused"
    message = inner.get("message") or data.get("message") or "no message"
    return str(code), str(message)


def _retry_after(error: dict[str, Any]) -> float:
    value = error.get("retry_after_ms")
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        return 1.0
    return min(max(value / 1000, 0.01), _MAX_RETRY_AFTER_S)


def _log_rejections(ack: dict[str, Any], low: int, high: int) -> None:
    rejected = ack.get("rejected") or []
    if not isinstance(rejected, list) or not rejected:
        return
    sample = "; ".join(
        f"seq {item.get('seq')}: {item.get('error')}" for item in rejected[:5] if isinstance(item, dict)
    )
    log.warning("hub rejected %d event(s) of seq %d-%d: %s", len(rejected), low, high, sample)
