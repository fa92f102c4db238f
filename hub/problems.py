"""The one error idiom: `HubError` types, RFC 7807 problems for HTTP and error acks for sockets."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)
PROBLEM_TYPE_BASE = "https://agenthub.dev/problems/"


class HubError(Exception):
    """An error a client may see; subclasses set status, a type slug and a title."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def code(self) -> str:
        """Machine code used in socket acks: the type slug with underscores."""
        return self.type.replace("-", "_")


class InvalidInput(HubError):
    status = 422
    type = "invalid-input"
    title = "Invalid input"


class BatchTooLarge(HubError):
    status = 413
    type = "batch-too-large"
    title = "Batch too large"


class Unauthorized(HubError):
    status = 401
    type = "unauthorized"
    title = "Authentication required"


class Forbidden(HubError):
    status = 403
    type = "forbidden"
    title = "Not allowed"


class NotFound(HubError):
    status = 404
    type = "not-found"
    title = "Not found"


class Unavailable(HubError):
    """Retryable: storage cannot take the batch now."""

    status = 503
    type = "unavailable"
    title = "Temporarily unavailable"

    def __init__(self, detail: str, *, retry_after_ms: int) -> None:
        super().__init__(detail, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms


class Overloaded(Unavailable):
    """Retryable: the ingest queue is full."""

    status = 503
    type = "overloaded"
    title = "Overloaded"


def problem(error: HubError, *, instance: str | None = None) -> dict[str, Any]:
    """Build the RFC 7807 body for `error`."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + error.type,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if instance:
        body["instance"] = instance
    body.update(error.extra)
    return body


def error_ack(error: HubError) -> dict[str, Any]:
    """Build the Socket.IO error ack for `error` (PROTOCOL.md)."""
    body: dict[str, Any] = {"code": error.code, "message": error.detail}
    if isinstance(error, Unavailable):
        body["retry_after_ms"] = error.retry_after_ms
    return {"error": body}


def problem_response(error: HubError, *, instance: str | None = None) -> web.Response:
    """Render `error` as an `application/problem+json` response."""
    headers = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(max(1, error.retry_after_ms // 1000))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="agenthub"'
    return web.json_response(
        problem(error, instance=instance),
        status=error.status,
        content_type="application/problem+json",
        headers=headers,
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every `HubError` and aiohttp HTTP error as a problem; hide internal errors."""
    try:
        return await handler(request)
    except HubError as error:
        return problem_response(error, instance=request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {
            "type": "about:blank",
            "title": exc.reason,
            "status": exc.status,
            "detail": exc.text or exc.reason,
            "instance": request.path,
        }
        return web.json_response(body, status=exc.status, content_type="application/problem+json")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(InternalError("internal error; see the hub log"), instance=request.path)


class InternalError(HubError):
    status = 500
    type = "internal"
    title = "Internal error"
