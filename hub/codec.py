"""Bytes to batches: the only place raw payloads are decoded, with size and depth limits."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson

from hub.problems import BatchTooLarge, InvalidInput


class SocketJson:
    """orjson in the shape python-socketio expects of its `json` module (2.6x on batches)."""

    @staticmethod
    def dumps(obj: Any, **_: Any) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        return orjson.loads(data)


def decode_batch(payload: Any, *, max_events: int, max_bytes: int) -> list[Any]:
    """Return the raw event list of an `events` payload (a JSON object or msgpack bytes)."""
    if isinstance(payload, bytes | bytearray):
        payload = _unpack(bytes(payload), max_bytes)
    if not isinstance(payload, dict):
        raise InvalidInput(f'a batch must be an object {{"events": [...]}}, got {_json_type(payload)}')
    events = payload.get("events")
    if not isinstance(events, list):
        raise InvalidInput(f"'events' must be a list, got {_json_type(events)}")
    if len(events) > max_events:
        raise BatchTooLarge(
            f"the batch has {len(events)} events; the limit is {max_events} (max_batch_events)",
            limit=max_events,
        )
    return events


def _unpack(data: bytes, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise BatchTooLarge(
            f"the batch is {len(data)} bytes; the limit is {max_bytes} (max_batch_bytes)",
            limit=max_bytes,
        )
    try:
        # unpackb bounds every string, array and map length by the buffer's own size.
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidInput(f"the payload is not valid msgpack: {exc}") from exc


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def depth(value: Any, limit: int) -> int:
    """Return the nesting depth of `value`, stopping early once it passes `limit`."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return 0
    deepest = 0
    for child in children:
        deepest = max(deepest, depth(child, limit))
        if deepest >= limit:
            break
    return deepest + 1
