"""Operator tokens against every route the API serves: 401 without a good token, 403 without the scope.

The matrix iterates over `hub.api.TABLES`, so a route added later is covered without
touching this file.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any

import aiohttp
import jwt
import pytest
from pydantic import BaseModel, ValidationError

from hub.api import TABLES
from hub.api.signatures import AGENT_SIGNATURE
from hub.api.spec import Route
from hub.keys import REVOKED_TOKENS
from hub.tokens import SCOPES, RevokedTokens, TokenVerifier, issue_token
from tests.conftest import RunningHub

ROUTES = [route for table in TABLES for route in table.routes if route.path.startswith("/api/v1/")]
PROTECTED = [route for route in ROUTES if route.scope in SCOPES]  # operator token routes
PUBLIC = [route for route in ROUTES if route.scope is None]
# Plausible path values; each parameter gets the first its model accepts (a 404 is fine).
_SAMPLES = ("1", "agent-1", "agent-1:1000:1700000000.0", "0123456789abcdef" * 2, "0123456789abcdef" * 4)
_PARAM = re.compile(r"{(\w+)}")


def _name(route: Route) -> str:
    return f"{route.method} {route.path}"


def _url(route: Route) -> str:
    model = route.path_params
    values = {
        name: next((sample for sample in _SAMPLES if _accepts(model, name, sample)), "1")
        for name in (model.model_fields if model else {})
    }
    return _PARAM.sub(lambda match: urllib.parse.quote(values[match[1]], safe=":"), route.path)


def _accepts(model: type[BaseModel] | None, name: str, value: str) -> bool:
    assert model is not None
    try:
        model.model_validate(dict.fromkeys(model.model_fields, value))
    except ValidationError as exc:
        return all(error["loc"][0] != name for error in exc.errors())
    return True


async def _status(http: aiohttp.ClientSession, route: Route, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] | None = {} if route.body is not None else None
    async with http.request(route.method, _url(route), json=body, headers=headers) as response:
        detail = ""
        if response.content_type == "application/problem+json":
            detail = (await response.json())["detail"]
        return response.status, detail


def _claims(hub: RunningHub, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "tester", "scope": "hub:admin", "iat": now, "exp": now + 600,
              "iss": hub.settings.jwt_issuer, "aud": hub.settings.jwt_audience, "jti": "matrix"}  # fmt: skip
    return {**claims, **changes}


def _secret(hub: RunningHub) -> str:
    assert hub.settings.jwt_secret is not None
    return hub.settings.jwt_secret.get_secret_value()


def test_the_matrix_sees_every_route() -> None:
    assert any(route.path == "/api/v1/audit" for route in PROTECTED)
    # The only others are the routes agents call with signed requests (tests/test_api_ingest.py).
    assert {route.scope for route in ROUTES} <= {*SCOPES, None, AGENT_SIGNATURE}


@pytest.mark.parametrize("route", PROTECTED, ids=_name)
async def test_every_protected_route_refuses_bad_tokens_and_missing_scopes(
    hub: RunningHub, http: aiohttp.ClientSession, route: Route
) -> None:
    now = int(time.time())
    revoked = issue_token(hub.settings, scopes=["hub:admin"], subject="gone")
    await hub.app[REVOKED_TOKENS].revoke(revoked.jti, reason="test")
    refused = {
        "no token": (None, "bearer token is required"),
        "not a JWT": ("not-a-token", "not valid"),
        "forged": (jwt.encode(_claims(hub), "another-secret-" + "z" * 40, algorithm="HS256"), "not valid"),
        "unsigned": (jwt.encode(_claims(hub), key="", algorithm="none"), "not valid"),
        "wrong audience": (
            jwt.encode(_claims(hub, aud="elsewhere"), _secret(hub), algorithm="HS256"),
            "not valid",
        ),
        "expired": (
            jwt.encode(_claims(hub, iat=now - 7200, exp=now - 3600), _secret(hub), algorithm="HS256"),
            "expired",
        ),
        "revoked": (revoked.token, "the token has been revoked"),
    }
    for case, (token, words) in refused.items():
        status, detail = await _status(http, route, token)
        assert status == 401, f"{_name(route)} with {case}: {status} {detail}"
        assert words in detail, f"{_name(route)} with {case}: {detail}"

    verifier = TokenVerifier(hub.settings)
    for scope in SCOPES:
        token = issue_token(hub.settings, scopes=[scope], subject="tester").token
        status, detail = await _status(http, route, token)
        if route.scope in verifier.verify(token).scopes:
            assert status not in (401, 403), f"{_name(route)} with {scope}: {status} {detail}"
        else:
            assert status == 403, f"{_name(route)} with {scope}: {status} {detail}"
            assert f"'{route.scope}'" in detail


@pytest.mark.parametrize("route", PUBLIC, ids=_name)
async def test_public_routes_answer_without_a_token(
    hub: RunningHub, http: aiohttp.ClientSession, route: Route
) -> None:
    status, detail = await _status(http, route, None)
    assert status not in (401, 403), f"{_name(route)}: {status} {detail}"


async def test_revocation_is_cached_briefly_and_revoked_ids_for_good(hub: RunningHub) -> None:
    now = [0.0]
    cache = RevokedTokens(hub.store, ttl_s=1.0, clock=lambda: now[0])
    other_node = RevokedTokens(hub.store, ttl_s=1.0)
    assert not await cache.is_revoked("abc")
    await other_node.revoke("abc", reason="elsewhere")
    assert not await cache.is_revoked("abc")  # within the TTL: still the cached answer
    now[0] = 1.5
    assert await cache.is_revoked("abc")
    record = await other_node.revoke("abc", reason="again")
    assert record["reason"] == "elsewhere"  # the first revocation stands
