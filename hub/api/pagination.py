"""Cursor pagination: opaque, tamper-evident cursors and the one list shape.

A cursor carries the sort key of the last item served, signed with a key derived from the
hub's secret and bound to the list and its filters: a cursor edited by hand, or reused on
another list or with other filters, is refused. Lists are ordered by immutable keys, so
rows inserted between pages are neither skipped nor repeated among those already listed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from hub.keys import CURSORS
from hub.problems import BadCursor
from hub.store import Page

T = TypeVar("T")
MAX_LIMIT = 500
_MAC_BYTES = 16
_UNBOUND = ("cursor", "limit")  # the query parameters a cursor may be used with freely


class PageQuery(BaseModel):
    """The query parameters of every list."""

    model_config = ConfigDict(extra="forbid")

    cursor: str | None = Field(None, description="`pagination.cursor` of the previous page")
    limit: int = Field(50, ge=1, le=MAX_LIMIT, description="most items on this page")


class Pagination(BaseModel):
    cursor: str | None = Field(description="pass as `cursor` to get the next page; null on the last")
    has_more: bool


class PageOf(BaseModel, Generic[T]):
    """One page of a list."""

    data: list[T]
    pagination: Pagination


class Cursors:
    """Seal sort keys into cursors and open them again, for one hub secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"agenthub cursor key\0" + secret.encode()).digest()

    def open(self, request: web.Request, cursor: str | None) -> list[Any] | None:
        """Return the sort key sealed in `cursor`, or None for the first page."""
        if not cursor:
            return None
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except ValueError:
            raw = b""
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(request, payload)):
            raise BadCursor("cursor is not one this hub issued for this list and these filters")
        key = orjson.loads(payload)
        assert isinstance(key, list)
        return key

    def page(self, request: web.Request, page: Page) -> dict[str, Any]:
        """Render `page` in the list shape, with the cursor to the next page."""
        cursor = None
        if page.next_key is not None:
            payload = orjson.dumps(page.next_key)
            cursor = base64.urlsafe_b64encode(payload + self._mac(request, payload)).decode().rstrip("=")
        return {"data": page.items, "pagination": {"cursor": cursor, "has_more": cursor is not None}}

    def _mac(self, request: web.Request, payload: bytes) -> bytes:
        filters = sorted((name, value) for name, value in request.query.items() if name not in _UNBOUND)
        context = orjson.dumps([request.method, request.path, filters])
        return hmac.new(self._key, context + b"\0" + payload, hashlib.sha256).digest()[:_MAC_BYTES]


async def paginate(
    request: web.Request,
    query: PageQuery,
    fetch: Callable[..., Awaitable[Page]],
    *args: Any,
    render: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **filters: Any,
) -> dict[str, Any]:
    """Answer one page of a list: `fetch(*args, **filters, after=..., limit=...)` at the query's cursor."""
    cursors = request.app[CURSORS]
    page = await fetch(*args, **filters, after=cursors.open(request, query.cursor), limit=query.limit)
    if render is not None:
        page = Page([render(item) for item in page.items], page.next_key)
    return cursors.page(request, page)
