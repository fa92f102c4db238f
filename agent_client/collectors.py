"""Real host activity (processes, connections, listeners) from psutil and /proc."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple

import psutil

from agent_client.wire import Event

# Hub defaults for string and argv limits; longer values are cut here rather than rejected there.
MAX_STRING: Final = 4096
MAX_ARGV_ITEMS: Final = 256
MAX_ARGV_CHARS: Final = 32 * 1024

_PROCESS_ATTRS: Final = ["ppid", "exe", "name", "cmdline", "uids", "create_time"]
_PF_KTHREAD: Final = 0x00200000
_OUTBOUND_TCP_STATES: Final = frozenset({psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT})
_STARTED: Final = time.monotonic()


_SETTLE_S = 1.0  # a process this young with no command line is still starting


class _Proc(NamedTuple):
    comm: str | None
    exe: str | None
    kernel: bool = False


class _Socket(NamedTuple):
    pid: int
    protocol: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int


class HostCollector:
    """Poll the host and report each new process, exit, connection and listener once."""

    def __init__(self, *, interval: float = 1.0, max_new_processes: int = 5000) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.max_new_processes = max_new_processes
        self._procs: dict[int, _Proc] = {}
        self._connections: set[_Socket] = set()
        self._listeners: set[_Socket] = set()
        self._net_denied = False

    async def stream(self) -> AsyncGenerator[Event, None]:
        """Yield events forever, one scan per `interval`; the first reports running processes."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            for event in await asyncio.to_thread(self.poll):
                yield event
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def poll(self) -> list[Event]:
        """Scan the host once and return what changed since the previous scan."""
        events = self._poll_processes()
        events.extend(self._poll_sockets())
        return events

    def _poll_processes(self) -> list[Event]:
        current = set(psutil.pids())
        now = time.time()
        gone = [pid for pid in self._procs if pid not in current]
        events = [_exit_event(pid, self._procs.pop(pid), now) for pid in gone]
        # a bounded number per scan keeps the first one cheap; the rest follow next time
        for pid in sorted(current - self._procs.keys())[: self.max_new_processes]:
            if _is_kernel_thread(pid):
                self._procs[pid] = _Proc(None, None, kernel=True)
                continue
            event = _start_event(pid)
            if event is None:
                continue
            if "argv" not in event and now - event["ts"] < _SETTLE_S:
                continue  # caught mid-exec (no command line yet): read it again next poll
            self._procs[pid] = _Proc(event.get("comm"), event.get("exe"))
            events.append(event)
        return [event for event in events if event is not None]

    def _poll_sockets(self) -> list[Event]:
        if self._net_denied:
            return []
        try:
            conns = psutil.net_connections(kind="inet")
        except psutil.AccessDenied:
            self._net_denied = True
            return []
        listeners, connections = _classify(conns)
        now = time.time()
        events = [self._net_event("net_listen", s, now) for s in listeners - self._listeners]
        events += [self._net_event("net_connect", s, now) for s in connections - self._connections]
        # forgetting closed sockets lets the same address pair be reported again when reused
        self._listeners, self._connections = listeners, connections
        return events

    def _net_event(self, kind: str, sock: _Socket, now: float) -> Event:
        listen = kind == "net_listen"
        event: Event = {
            "ts": now,
            "kind": kind,
            "pid": sock.pid,
            "protocol": sock.protocol,
            "dst_ip": sock.local_ip if listen else sock.remote_ip,
            "dst_port": sock.local_port if listen else sock.remote_port,
        }
        if not listen:
            event["metadata"] = {"src_ip": sock.local_ip, "src_port": sock.local_port}
        proc = self._procs.get(sock.pid)
        if proc is not None:
            _put(event, "comm", proc.comm)
            _put(event, "exe", proc.exe)
        return event


def host_stats() -> dict[str, float]:
    """Return the heartbeat's host figures: CPU, memory and root-disk use, agent uptime."""
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_percent": psutil.virtual_memory().percent,
        "disk_percent": psutil.disk_usage("/").percent,
        "uptime_s": round(time.monotonic() - _STARTED, 3),
    }


def _start_event(pid: int) -> Event | None:
    try:
        info = psutil.Process(pid).as_dict(attrs=_PROCESS_ATTRS, ad_value=None)
    except psutil.Error:  # gone between listing and reading
        return None
    event: Event = {"ts": info["create_time"] or time.time(), "kind": "process_start", "pid": pid}
    _put(event, "ppid", info["ppid"])
    _put(event, "exe", _clip(info["exe"]))
    _put(event, "comm", _clip(info["name"]))
    if info["cmdline"]:
        event["argv"] = _clip_argv(info["cmdline"])
    if info["uids"] is not None:
        event["uid"] = info["uids"].real
    return event


def _exit_event(pid: int, proc: _Proc, now: float) -> Event | None:
    if proc.kernel:
        return None
    event: Event = {"ts": now, "kind": "process_exit", "pid": pid}
    _put(event, "comm", proc.comm)
    _put(event, "exe", proc.exe)
    return event


def _classify(conns: Iterable[Any]) -> tuple[set[_Socket], set[_Socket]]:
    listeners: set[_Socket] = set()
    candidates: list[_Socket] = []
    for conn in conns:
        sock = _socket(conn)
        if sock is None:
            continue
        if conn.status == psutil.CONN_LISTEN or (sock.protocol == "udp" and not conn.raddr):
            listeners.add(sock)
        elif conn.raddr and (sock.protocol == "udp" or conn.status in _OUTBOUND_TCP_STATES):
            candidates.append(sock)
    # a TCP connection on a listening port was accepted, not made: it is not outbound
    listening = {s.local_port for s in listeners if s.protocol == "tcp"}
    outbound = {s for s in candidates if s.protocol == "udp" or s.local_port not in listening}
    return listeners, outbound


def _socket(conn: Any) -> _Socket | None:
    if not conn.laddr:
        return None
    protocol = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
    remote_ip, remote_port = (conn.raddr.ip, conn.raddr.port) if conn.raddr else ("", 0)
    return _Socket(conn.pid or 0, protocol, conn.laddr.ip, conn.laddr.port, remote_ip, remote_port)


def _is_kernel_thread(pid: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # fields after the parenthesised comm: state ppid pgrp session tty tpgid flags ...
    fields = stat[stat.rfind(")") + 2 :].split()
    return len(fields) > 6 and int(fields[6]) & _PF_KTHREAD != 0


def _clip(value: str | None) -> str | None:
    return value[:MAX_STRING] if value else None


def _clip_argv(argv: list[str]) -> list[str]:
    kept: list[str] = []
    total = 0
    for arg in argv[:MAX_ARGV_ITEMS]:
        piece = arg[: min(MAX_STRING, MAX_ARGV_CHARS - total)]
        kept.append(piece)
        total += len(piece)
        if total >= MAX_ARGV_CHARS:
            break
    return kept


def _put(event: Event, key: str, value: object) -> None:
    if value is not None:
        event[key] = value
