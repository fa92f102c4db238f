"""Idempotency-Key: a retried POST gets the first answer instead of doing the work twice.

The first successful (2xx) answer to a key is stored with a hash of the request, per
principal, for `idempotency_ttl_s`, in the database (so replays survive a restart). The
same key with the same request replays it, marked `Idempotent-Replayed: true`; the same
key with another request is a 422 problem; the same key while its first request is still
running is a 409 problem. An answer that carries a secret (`Cache-Control: no-store`) is
not kept: the same key then answers 409 instead of doing the work again.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable

from aiohttp import web
from aiohttp.typedefs import Handler

from hub.api.auth import caller
from hub.api.bodies import read_body
from hub.keys import SETTINGS, STORE
from hub.problems import Conflict, InvalidInput

HEADER = "Idempotency-Key"
_VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as the IETF draft's examples
_KEPT_BACK = "x-agenthub/kept-back"  # stored in place of an answer marked no-store (it held a secret)
IN_FLIGHT = web.AppKey("idempotency_in_flight", set[tuple[str, str]])  # (owner, key) being served


@web.middleware
def idempotency_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Replay the stored answer of a POST whose Idempotency-Key was seen before."""
    key = request.headers.get(HEADER)
    if key is None or request.method != "POST" or not request.path.startswith("/api/"):
        return handler(request)
    return _idempotent(request, handler, key)


async def _idempotent(request: web.Request, handler: Handler, key: str) -> web.StreamResponse:
    if not _VALID_KEY.match(key):
        raise InvalidInput(f"{HEADER} must be 1-255 visible ASCII characters")
    owner = caller(request)
    # Claimed before anything is awaited: two requests with one key never both run the handler.
    in_flight = request.app[IN_FLIGHT]
    if (owner, key) in in_flight:
        raise Conflict(f"a request with {HEADER} {key!r} is still in progress; retry when it has finished")
    in_flight.add((owner, key))
    try:
        return await _serve_once(request, handler, owner, key)
    finally:
        in_flight.discard((owner, key))


async def _serve_once(request: web.Request, handler: Handler, owner: str, key: str) -> web.StreamResponse:
    digest = await _request_hash(request)
    store, now = request.app[STORE], time.time()
    stored = await store.get_idempotent(owner, key, now)
    if stored is not None:
        if stored["request_hash"] != digest:
            raise InvalidInput(f"{HEADER} {key!r} was already used with a different request")
        if stored["content_type"] == _KEPT_BACK:
            raise Conflict(
                f"the request with {HEADER} {key!r} was done; its answer carried a secret, which the hub "
                "does not keep: look the result up, or rotate the secret"
            )
        headers = {
            "Idempotent-Replayed": "true",
            **({"Location": stored["location"]} if stored["location"] else {}),
        }
        return web.Response(
            body=stored["body"], status=stored["status"], content_type=stored["content_type"], headers=headers
        )
    response = await handler(request)
    if isinstance(response, web.Response) and 200 <= response.status < 300:
        secret = response.headers.get("Cache-Control") == "no-store"
        answer = {
            "request_hash": digest,
            "status": response.status,
            "content_type": _KEPT_BACK if secret else response.content_type,
            "body": b"" if secret else bytes(response.body or b""),  # type: ignore[arg-type]  # ours are bytes
            "location": response.headers.get("Location"),
        }
        await store.save_idempotent(owner, key, answer, now + request.app[SETTINGS].idempotency_ttl_s)
    return response


async def _request_hash(request: web.Request) -> str:
    digest = hashlib.sha256(f"{request.method} {request.path_qs}\n".encode())
    digest.update(await read_body(request))
    return digest.hexdigest()
