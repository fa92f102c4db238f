"""The one error idiom: `HubError` types, RFC 7807 problems for HTTP and error acks for sockets."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)
PROBLEM_TYPE_BASE = "https://agenthub.dev/problems/"
CORRELATION_ID = web.RequestKey("correlation_id", str)
REQUEST_ID_HEADER = "X-Request-ID"
# A client's own request id is used when it is a sane token: it reaches logs and the audit log.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Headers every answer to a request carries, problems included (rate limits, for one).
RESPONSE_HEADERS = web.RequestKey("response_headers", dict[str, str])
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An RFC 7807 problem; extra members (errors, retry_after_ms, ...) depend on the type.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "correlation_id": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}


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


class PayloadTooLarge(HubError):
    status = 413
    type = "payload-too-large"
    title = "Request body too large"


class UnsupportedMediaType(HubError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class BadCursor(HubError):
    status = 400
    type = "bad-cursor"
    title = "Bad cursor"


class Conflict(HubError):
    status = 409
    type = "conflict"
    title = "Conflict"


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


class MethodNotAllowed(HubError):
    status = 405
    type = "method-not-allowed"
    title = "Method not allowed"


class RateLimited(HubError):
    status = 429
    type = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, retry_after_s=retry_after_s)
        self.retry_after_s = retry_after_s


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


def problem_response(
    error: HubError, *, instance: str | None = None, correlation_id: str | None = None
) -> web.Response:
    """Render `error` as an `application/problem+json` response."""
    headers = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(max(1, error.retry_after_ms // 1000))
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="agenthub"'
    body = problem(error, instance=instance)
    if correlation_id:
        body["correlation_id"] = correlation_id
    return web.json_response(
        body, status=error.status, content_type="application/problem+json", headers=headers
    )


class InternalError(HubError):
    status = 500
    type = "internal"
    title = "Internal error"


# aiohttp's own refusals (no route, wrong method, body over client_max_size), in our words.
_HTTP_ERRORS: dict[int, type[HubError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as a problem with a correlation id; never show internals."""
    correlation_id = request_id(request)
    # X-Correlation-ID is the older name of the same id, kept for clients that read it.
    request[RESPONSE_HEADERS] = {REQUEST_ID_HEADER: correlation_id, "X-Correlation-ID": correlation_id}
    try:
        response = await handler(request)
    except HubError as error:
        response = problem_response(error, instance=request.path, correlation_id=correlation_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_ERRORS.get(exc.status)
        if kind is None:
            response = problem_response(
                _http_error(exc), instance=request.path, correlation_id=correlation_id
            )
        else:
            detail = f"{request.method} {request.path}: {exc.reason.lower()}"
            response = problem_response(kind(detail), instance=request.path, correlation_id=correlation_id)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception(
            "unhandled error on %s %s (correlation id %s)", request.method, request.path, correlation_id
        )
        hidden = InternalError(
            f"internal error; the hub log has the details under correlation id {correlation_id}"
        )
        response = problem_response(hidden, instance=request.path, correlation_id=correlation_id)
    if not response.prepared:  # a WebSocket has sent its headers already
        response.headers.update(request[RESPONSE_HEADERS])
    return response


def request_id(request: web.Request) -> str:
    """Return the request's correlation id: the client's sane `X-Request-ID`, else a new one."""
    known = request.get(CORRELATION_ID)
    if known is None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        known = offered if _SANE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        request[CORRELATION_ID] = known
    return known


def _http_error(exc: web.HTTPException) -> HubError:
    slug = exc.reason.lower().replace(" ", "-")
    kind: type[HubError] = type(
        "HttpError", (HubError,), {"status": exc.status, "type": slug, "title": exc.reason}
    )
    return kind(exc.text or exc.reason)
