"""Replaying events from a JSONL file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent_client.replay import ReplayError, count_events, replay


async def _collect(path: Path, rate: float | None = None) -> list[dict[str, object]]:
    return [event async for event in replay(path, rate=rate)]


async def test_replays_a_good_file_in_order_without_seq(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"seq": 7, "ts": 1.5, "kind": "process_start", "pid": 10, "exe": "/bin/sh"}\n'
        "\n"
        '{"ts": 2.5, "kind": "net_connect", "pid": 10, "dst_ip": "10.0.0.1", "dst_port": 443}\n'
    )
    events = await _collect(path)
    assert events == [
        {"ts": 1.5, "kind": "process_start", "pid": 10, "exe": "/bin/sh"},
        {"ts": 2.5, "kind": "net_connect", "pid": 10, "dst_ip": "10.0.0.1", "dst_port": 443},
    ]
    assert count_events(path) == 2


async def test_a_bad_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": 1, "kind": "custom", "pid": 1}\n{"ts": 2, "kind": "custom", "pid": 1\n')
    with pytest.raises(ReplayError, match=r"events\.jsonl:2: not valid JSON"):
        await _collect(path)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"kind": "teleport", "pid": 1}', "'kind' must be one of"),
        ('{"kind": "custom", "pid": -1}', "'pid' must be an integer"),
        ('{"kind": "custom", "pid": 1, "ts": "yesterday"}', "'ts' must be a number"),
    ],
)
def test_an_invalid_event_names_its_line(tmp_path: Path, line: str, complaint: str) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "custom", "pid": 1}\n' + line + "\n")
    with pytest.raises(ReplayError, match=f":2: {complaint}"):
        count_events(path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="cannot read"):
        count_events(tmp_path / "nope.jsonl")


async def test_rate_paces_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": 1, "kind": "custom", "pid": 1}\n' * 5)
    started = time.monotonic()
    events = await _collect(path, rate=50)
    assert len(events) == 5
    assert time.monotonic() - started >= 4 / 50
