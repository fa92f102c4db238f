"""The command allow-list, without a hub in the way."""

from __future__ import annotations

from typing import Any

import pytest

from agent_client.commands import execute


class _Host:
    def __init__(self) -> None:
        self.flushed = 0

    def status(self) -> dict[str, Any]:
        return {"spool_depth": 3}

    def flush(self) -> int:
        self.flushed += 1
        return 3


async def test_ping_answers_with_pong() -> None:
    ack = await execute(_Host(), {"id": "1", "name": "ping", "args": {}})
    assert ack["ok"] is True
    assert ack["error"] is None
    assert ack["result"]["pong"] is True
    assert isinstance(ack["result"]["ts"], float)


async def test_flush_spool_wakes_the_sender() -> None:
    host = _Host()
    ack = await execute(host, {"id": "2", "name": "flush_spool"})
    assert ack == {"id": "2", "ok": True, "result": {"spool_depth": 3}, "error": None}
    assert host.flushed == 1


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ({"id": "3", "name": "shell", "args": {"cmd": "id"}}, "not on this agent's allow-list"),
        ({"id": "4", "name": 5, "args": {}}, "needs a string 'name'"),
        ({"id": "5", "name": "ping", "args": [1]}, "needs a string 'name' and an object 'args'"),
        ("ping", "must be an object"),
    ],
)
async def test_refuses_what_it_cannot_run(command: object, error: str) -> None:
    ack = await execute(_Host(), command)
    assert ack["ok"] is False
    assert ack["result"] is None
    assert error in ack["error"]
