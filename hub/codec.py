"""Bytes to batches: the only place raw payloads are decoded, with size and depth limits."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson

from hub.problems import BatchTooLarge, InvalidInput


class WirePayload(dict[str, Any]):
    """An object argument of a Socket.IO event, with the size of the text it arrived in."""

    def __init__(self, value: dict[str, Any], wire_bytes: int) -> None:
        super().__init__(value)
        self.wire_bytes = wire_bytes


class SocketJson:
    """orjson in the shape python-socketio expects of its `json` module (2.6x on batches).

    python-socketio passes `loads` the text of each packet, which is the only place a JSON
    batch's size is known; the object argument of an event remembers it.
    """

    @staticmethod
    def dumps(obj: Any, **_: Any) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        value = orjson.loads(data)
        if isinstance(value, list) and len(value) == 2 and type(value[1]) is dict:
            size = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
            value[1] = WirePayload(value[1], size)
        return value


def decode_batch(payload: Any, *, max_events: int, max_bytes: int) -> list[Any]:
    """Return the raw event list of an `events` payload (a JSON object or msgpack bytes)."""
    if isinstance(payload, bytes | bytearray):
        payload = _unpack(bytes(payload), max_bytes)
    elif isinstance(payload, WirePayload) and payload.wire_bytes > max_bytes:
        raise _too_many_bytes(payload.wire_bytes, max_bytes)
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
        raise _too_many_bytes(len(data), max_bytes)
    try:
        # unpackb bounds every string, array and map length by the buffer's own size.
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidInput(f"the payload is not valid msgpack: {exc}") from exc


def _too_many_bytes(size: int, max_bytes: int) -> BatchTooLarge:
    return BatchTooLarge(
        f"the batch is {size} bytes; the limit is {max_bytes} (max_batch_bytes)", limit=max_bytes
    )


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


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Return whether containers in `value` nest more than `limit` levels (no recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, level = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if level > limit:
            return True
        pending.extend((child, level + 1) for child in children)
    return False
