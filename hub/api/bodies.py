"""Request bodies: the size limit and media type every reader of a body enforces."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from hub.keys import SETTINGS
from hub.problems import InvalidInput, PayloadTooLarge, UnsupportedMediaType


async def read_body(request: web.Request) -> bytes:
    """Return the request body, refusing one over `api_max_body_bytes`."""
    limit = request.app[SETTINGS].api_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body has {request.content_length} bytes; the limit is {limit}")
    raw = await request.read()
    if len(raw) > limit:
        raise PayloadTooLarge(f"the body has {len(raw)} bytes; the limit is {limit}")
    return raw


async def read_json(request: web.Request) -> Any:
    """Parse a JSON request body (none reads as `{}`), refusing other media types and oversize bodies."""
    raw = await read_body(request)
    if not raw:
        return {}
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json, not {request.content_type}")
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """Decode a JSON body; invalid JSON is a 422 saying where it broke."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
