"""Events read back from a JSON Lines file, for tests, demos and load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from os import PathLike
from pathlib import Path

import orjson

from agent_client.wire import EVENT_KINDS, Event


class ReplayError(ValueError):
    """A replay file that cannot be read, naming the file and line."""


def read_events(path: str | PathLike[str]) -> Iterator[Event]:
    """Yield the events of a JSONL file in order, without `seq`; blank lines are skipped."""
    try:
        with Path(path).open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _parse(path, number, line)
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def count_events(path: str | PathLike[str]) -> int:
    """Check every line of a JSONL file and return how many events it holds."""
    return sum(1 for _ in read_events(path))


async def replay(path: str | PathLike[str], *, rate: float | None = None) -> AsyncGenerator[Event, None]:
    """Yield a JSONL file's events, at most `rate` per second when given."""
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    started = time.monotonic()
    for index, event in enumerate(read_events(path)):
        if rate is not None:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif index % 1000 == 0:
            await asyncio.sleep(0)  # let the rest of the agent run during a fast replay
        yield event


def _parse(path: str | PathLike[str], number: int, line: bytes) -> Event:
    where = f"{path}:{number}"
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ReplayError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ReplayError(f"{where}: expected a JSON object, got {type(event).__name__}")
    if event.get("kind") not in EVENT_KINDS:
        raise ReplayError(f"{where}: 'kind' must be one of {', '.join(sorted(EVENT_KINDS))}")
    pid = event.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise ReplayError(f"{where}: 'pid' must be an integer >= 0")
    ts = event.setdefault("ts", time.time())
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise ReplayError(f"{where}: 'ts' must be a number (epoch seconds)")
    event.pop("seq", None)
    return event
