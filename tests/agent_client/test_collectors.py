"""The host collector on this very machine: real processes, real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent_client.collectors import HostCollector, host_stats


def _find(events: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return [e for e in events if all(e.get(key) == value for key, value in fields.items())]


def _poll_until(
    collector: HostCollector, match: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Poll until `match` finds something; processes and sockets appear asynchronously."""
    seen: list[dict[str, Any]] = []
    for _ in range(50):
        seen += collector.poll()
        found = match(seen)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the collector never reported it")


def test_first_poll_reports_running_processes_with_details() -> None:
    events = HostCollector().poll()
    mine = _find(events, kind="process_start", pid=os.getpid())
    assert len(mine) == 1
    event = mine[0]
    assert event["ppid"] == os.getppid()
    assert event["exe"]
    assert event["argv"]
    assert event["uid"] == os.getuid()
    assert abs(event["ts"] - time.time()) < 24 * 3600
    assert "seq" not in event


def test_each_process_is_reported_once() -> None:
    collector = HostCollector()
    collector.poll()
    again = collector.poll()
    assert _find(again, kind="process_start", pid=os.getpid()) == []


def test_reports_a_new_process_and_its_exit() -> None:
    collector = HostCollector()
    collector.poll()
    child = subprocess.Popen(["sleep", "5"])
    try:
        started = _poll_until(collector, lambda seen: _find(seen, kind="process_start", pid=child.pid))
        assert started[0]["ppid"] == os.getpid()
        assert started[0]["argv"] == ["sleep", "5"]
        assert started[0]["comm"] == "sleep"
    finally:
        child.kill()
        child.wait()
    exited = _poll_until(collector, lambda seen: _find(seen, kind="process_exit", pid=child.pid))
    assert len(exited) == 1
    assert exited[0]["comm"] == "sleep"


def test_reports_a_listening_socket_once() -> None:
    collector = HostCollector()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        found = _poll_until(collector, lambda seen: _find(seen, kind="net_listen", dst_port=port))
        assert found[0]["pid"] == os.getpid()
        assert found[0]["protocol"] == "tcp"
        assert found[0]["dst_ip"] == "127.0.0.1"
        assert _find(collector.poll(), kind="net_listen", dst_port=port) == []


def test_reports_an_outbound_connection_but_not_the_accepted_side() -> None:
    collector = HostCollector()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        collector.poll()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                found = _poll_until(collector, lambda seen: _find(seen, kind="net_connect", dst_port=port))
                assert len(found) == 1
                assert found[0]["pid"] == os.getpid()
                assert found[0]["dst_ip"] == "127.0.0.1"
                assert found[0]["metadata"]["src_port"] == client.getsockname()[1]


async def test_stream_yields_events_from_polls() -> None:
    stream = HostCollector(interval=0.05).stream()
    try:
        first = await anext(stream)
        assert first["kind"] == "process_start"
    finally:
        await stream.aclose()


def test_host_stats_are_percentages_and_uptime() -> None:
    stats = host_stats()
    assert set(stats) == {"cpu_percent", "mem_percent", "disk_percent", "uptime_s"}
    assert 0 <= stats["mem_percent"] <= 100
    assert 0 <= stats["disk_percent"] <= 100
    assert stats["uptime_s"] >= 0


def test_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        HostCollector(interval=0)
