"""Webhook subscriptions over real TLS: CRUD, secrets shown once, the SSRF guard, scopes, OpenAPI."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from yarl import URL

from hub.config import Settings
from hub.notify import DestinationPolicy, DestinationRefused, GuardedResolver
from tests.conftest import HubStarter, RunningHub, call, client_ssl

WEBHOOKS = "/api/v1/webhooks"
# A public address: these tests raise no event, so nothing is sent to it and it need not answer.
RECEIVER = "https://1.1.1.1/hooks/agenthub"
UNKNOWN = "wh_" + "0" * 32
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Room for three subscriptions: enough to page through, few enough to reach the limit."""
    return settings.model_copy(update={"webhook_max_subscriptions": 3})


@pytest.fixture
async def internal_hub(hub_with: HubStarter) -> RunningHub:
    """A hub whose webhooks may reach loopback receivers (HUB_WEBHOOK_ALLOW)."""
    return await hub_with({"webhook_allow": LOOPBACK})


async def create(http: aiohttp.ClientSession, hub: RunningHub, **fields: Any) -> dict[str, Any]:
    status, webhook = await call(
        http, hub, "POST", WEBHOOKS, {"url": RECEIVER, "event_types": ["alert_raised"], **fields}
    )
    assert status == 201, webhook
    return dict(webhook)


async def refusal(http: aiohttp.ClientSession, hub: RunningHub, url: str) -> str:
    """Try to subscribe `url`; return the 422's detail."""
    status, problem = await call(http, hub, "POST", WEBHOOKS, {"url": url, "event_types": ["alert_raised"]})
    assert status == 422, problem
    assert problem["errors"][0]["location"] == "body.url"
    detail: str = problem["detail"]
    assert detail.startswith("body.url: ")
    return detail


def session_to(hub: RunningHub, policy: DestinationPolicy) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"), resolver=GuardedResolver(policy))
    return aiohttp.ClientSession(connector=connector)


# CRUD -------------------------------------------------------------------------------------


async def test_create_list_get_update_delete_round_trip(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    before = time.time()
    headers = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
    body = {"url": RECEIVER, "event_types": ["risk_threshold_crossed", "alert_raised", "alert_raised"],
            "min_severity": "HIGH", "description": "pager bridge"}  # fmt: skip
    async with http.post(WEBHOOKS, json=body, headers=headers) as response:
        assert response.status == 201
        created = await response.json()
        assert response.headers["Location"] == f"{WEBHOOKS}/{created['id']}"
    assert created["id"].startswith("wh_")
    assert created["secret"].startswith("whsec_")
    assert created["event_types"] == ["alert_raised", "risk_threshold_crossed"]  # sorted, once each
    assert created["deliveries"] == {"pending": 0, "dead": 0, "last_status": None, "last_delivery_at": None}
    assert (created["min_severity"], created["description"], created["enabled"]) == (
        "HIGH",
        "pager bridge",
        True,
    )
    assert created["created_by"] == "tester"
    assert before <= created["created_at"] == created["updated_at"] <= time.time()
    assert created["previous_secret_expires_at"] is None
    shown = {name: value for name, value in created.items() if name != "secret"}

    assert await call(http, hub, "GET", f"{WEBHOOKS}/{created['id']}") == (200, shown)
    status, listed = await call(http, hub, "GET", WEBHOOKS)
    assert (status, listed["data"], listed["pagination"]["has_more"]) == (200, [shown], False)

    status, changed = await call(
        http, hub, "PATCH", f"{WEBHOOKS}/{created['id']}", {"enabled": False, "description": None}
    )
    assert status == 200, changed
    assert (changed["enabled"], changed["description"]) == (False, None)
    assert changed["url"] == RECEIVER  # untouched: not sent
    assert changed["min_severity"] == "HIGH"
    assert changed["updated_at"] > changed["created_at"]
    assert "secret" not in changed
    assert await call(http, hub, "GET", f"{WEBHOOKS}/{created['id']}") == (200, changed)

    assert await call(http, hub, "DELETE", f"{WEBHOOKS}/{created['id']}") == (204, None)
    for method in ("GET", "PATCH", "DELETE", "POST"):
        path = f"{WEBHOOKS}/{created['id']}" + (":rotate-secret" if method == "POST" else "")
        status, problem = await call(http, hub, method, path, {} if method in ("PATCH", "POST") else None)
        assert (status, problem["detail"]) == (404, f"no webhook {created['id']}")
    assert (await call(http, hub, "GET", WEBHOOKS))[1]["data"] == []


async def test_the_secret_is_shown_only_on_create_and_rotate(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    webhook = await create(http, hub)
    path = f"{WEBHOOKS}/{webhook['id']}"
    status, rotated = await call(http, hub, "POST", f"{path}:rotate-secret")
    assert status == 200, rotated
    assert rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != webhook["secret"]
    assert rotated["previous_secret_expires_at"] is None  # replaced at once by default
    stored = await hub.store.get_webhook(webhook["id"])
    assert (stored["secret"], stored["previous_secret"]) == (rotated["secret"], None)

    status, rolled = await call(http, hub, "POST", f"{path}:rotate-secret", {"keep_previous_s": 3600})
    assert status == 200, rolled
    assert rolled["previous_secret_expires_at"] == pytest.approx(time.time() + 3600, abs=30)
    stored = await hub.store.get_webhook(webhook["id"])
    # Deliveries sign with both until the previous one expires.
    assert (stored["secret"], stored["previous_secret"]) == (rolled["secret"], rotated["secret"])

    for read in (await call(http, hub, "GET", path), await call(http, hub, "GET", WEBHOOKS)):
        text = json.dumps(read[1])
        assert 'secret"' not in text
        assert not any(secret in text for secret in (webhook["secret"], rotated["secret"], rolled["secret"]))
    status, changed = await call(http, hub, "PATCH", path, {"description": "renamed"})
    assert status == 200
    assert "secret" not in changed

    too_long = hub.settings.webhook_max_secret_overlap_s + 1
    status, problem = await call(http, hub, "POST", f"{path}:rotate-secret", {"keep_previous_s": too_long})
    assert status == 422
    assert problem["errors"][0]["location"] == "body.keep_previous_s"
    assert "HUB_WEBHOOK_MAX_SECRET_OVERLAP_S" in problem["detail"]


async def test_list_pages_in_creation_order_up_to_the_limit(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    ids = [(await create(http, hub, description=f"n{n}"))["id"] for n in range(3)]
    status, first = await call(http, hub, "GET", f"{WEBHOOKS}?limit=2")
    assert [w["id"] for w in first["data"]] == ids[:2]
    assert first["pagination"]["has_more"] is True
    status, rest = await call(http, hub, "GET", f"{WEBHOOKS}?limit=2&cursor={first['pagination']['cursor']}")
    assert ([w["id"] for w in rest["data"]], rest["pagination"]["has_more"]) == (ids[2:], False)

    status, problem = await call(
        http, hub, "POST", WEBHOOKS, {"url": RECEIVER, "event_types": ["agent_online"]}
    )
    assert status == 409
    assert "HUB_WEBHOOK_MAX_SUBSCRIPTIONS" in problem["detail"]
    await call(http, hub, "DELETE", f"{WEBHOOKS}/{ids[0]}")
    await create(http, hub)


async def test_a_patch_checks_the_url_and_the_filters_again(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    webhook = await create(http, hub, min_severity="CRITICAL")
    path = f"{WEBHOOKS}/{webhook['id']}"
    status, problem = await call(http, hub, "PATCH", path, {"url": "https://10.0.0.5/hook"})
    assert (status, problem["detail"]) == (
        422,
        "body.url: 10.0.0.5 is a private address; allow it with HUB_WEBHOOK_ALLOW",
    )
    # min_severity filters alerts: a subscription without them cannot keep one.
    status, problem = await call(http, hub, "PATCH", path, {"event_types": ["agent_offline"]})
    assert (status, problem["errors"][0]["location"]) == (422, "body.min_severity")
    for field in ("url", "event_types", "enabled"):
        status, problem = await call(http, hub, "PATCH", path, {field: None})
        assert (status, problem["errors"][0]["location"]) == (422, f"body.{field}")
    assert await call(http, hub, "GET", path) == (200, {k: v for k, v in webhook.items() if k != "secret"})

    status, changed = await call(
        http,
        hub,
        "PATCH",
        path,
        {"event_types": ["agent_offline"], "min_severity": None, "url": "https://[2606:4700::1111]/h"},
    )
    assert status == 200, changed
    assert (changed["event_types"], changed["min_severity"]) == (["agent_offline"], None)
    assert changed["url"] == "https://[2606:4700::1111]/h"
    assert await call(http, hub, "PATCH", path, {}) == (200, changed)  # nothing sent, nothing changed


async def test_a_webhook_creation_is_audited_without_its_secret(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    webhook = await create(http, hub)
    status, page = await call(http, hub, "GET", "/api/v1/audit?action=create_webhook")
    assert status == 200
    [entry] = page["data"]
    assert (entry["method"], entry["path"], entry["status"], entry["actor"]) == (
        "POST",
        WEBHOOKS,
        201,
        "tester",
    )
    assert webhook["secret"] not in json.dumps(page)


# the SSRF guard ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "https://127.0.0.1/hook",
            "127.0.0.1 is a loopback address; allow it with HUB_WEBHOOK_ALLOW",
        ),
        (
            "https://10.0.0.5/hook",
            "10.0.0.5 is a private address; allow it with HUB_WEBHOOK_ALLOW",
        ),
        ("https://192.168.1.20:8443/hook", "192.168.1.20 is a private address"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("https://[::1]/hook", "::1 is a loopback address"),
        ("https://[fd00::5]/hook", "fd00::5 is a private address"),
        ("https://[fe80::1]/hook", "fe80::1 is a link-local address"),
        ("https://[::ffff:10.0.0.5]/hook", "::ffff:a00:5 (IPv4 10.0.0.5) is a private address"),
        ("https://224.0.0.251/hook", "224.0.0.251 is a multicast address"),
        ("https://0.0.0.0/hook", "0.0.0.0 is an unspecified address"),
        ("https://240.0.0.1/hook", "240.0.0.1 is a reserved address"),
        ("https://100.64.0.1/hook", "100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("https://0.1.2.3/hook", "0.1.2.3 is a 'this network' address"),
        ("https://192.0.0.9/hook", "192.0.0.9 is an IETF protocol assignment address"),
        ("https://192.0.2.7/hook", "192.0.2.7 is a documentation address"),
        ("https://192.88.99.1/hook", "192.88.99.1 is a 6to4 relay anycast address"),
        ("https://198.18.0.1/hook", "198.18.0.1 is a benchmarking address"),
        ("https://255.255.255.255/hook", "255.255.255.255 is a broadcast address"),
        # Non-public IPv6 that ipaddress's is_global and is_private let through on some Pythons.
        ("https://[64:ff9b:1::a00:5]/hook", "64:ff9b:1::a00:5 is a local-use NAT64 address"),
        ("https://[64:ff9b::a00:5]/hook", "64:ff9b::a00:5 (IPv4 10.0.0.5) is a private address"),
        ("https://[64:ff9b::7f00:1]/hook", "64:ff9b::7f00:1 (IPv4 127.0.0.1) is a loopback address"),
        ("https://[2002:a00:5::]/hook", "2002:a00:5:: (IPv4 10.0.0.5) is a private address"),
        ("https://[2002:a9fe:a9fe::1]/hook", "(IPv4 169.254.169.254) is a link-local address"),
        ("https://[::ffff:0:a00:5]/hook", "::ffff:0:a00:5 is an IPv4-translated address"),
        ("https://[::a00:5]/hook", "::a00:5 is a deprecated IPv4-compatible address"),
        ("https://[fec0::1]/hook", "fec0::1 is a deprecated site-local address"),
        ("https://[100::1]/hook", "100::1 is a discard-only address"),
        ("https://[2001:db8::1]/hook", "2001:db8::1 is a documentation address"),
        ("https://[3fff::1]/hook", "3fff::1 is a documentation address"),
        ("https://[2001::1]/hook", "2001::1 is a Teredo address"),
        ("https://[2001:1::1]/hook", "2001:1::1 is an IETF protocol assignment address"),
        ("https://[ff02::1]/hook", "ff02::1 is a multicast address"),
        ("https://[5f00::1]/hook", "5f00::1 is a reserved address"),
        ("https://2130706433/hook", "host '2130706433' is not a canonical IP address"),
        ("https://user:pass@1.1.1.1/hook", "must not carry a user name or password"),
        ("http://user:pass@host.example/hook", "must not carry a user name or password"),
        ("http://1.1.1.1/hook", "must use https, not http (HUB_WEBHOOK_ALLOW_HTTP=true allows plain http)"),
        ("ftp://1.1.1.1/hook", "must use https, not ftp"),
        ("1.1.1.1/hook", "has no scheme; start it with https://"),
        ("https:///hook", "has no host"),
        (
            "https://bad_host-.example/",
            "host 'bad_host-.example' is neither a valid host name nor an IP address",
        ),
        ("https://localhost/hook", "localhost resolves to "),
        ("https://receiver.invalid/hook", "receiver.invalid does not resolve"),
        (
            "https://1.1.1.1/" + "x" * 2048,
            "has 2064 characters; the limit is 2048 (HUB_WEBHOOK_MAX_URL_CHARS)",
        ),
    ],
)
async def test_a_webhook_cannot_point_inside_the_network(
    hub: RunningHub, http: aiohttp.ClientSession, url: str, reason: str
) -> None:
    detail = await refusal(http, hub, url)
    assert reason in detail
    if url == "https://localhost/hook":
        assert "a loopback address; allow it with HUB_WEBHOOK_ALLOW" in detail


@pytest.mark.parametrize(
    ("url", "allowed_networks"),
    [
        ("https://1.1.1.1/hook", []),
        ("https://[2606:4700:4700::1111]/hook", []),
        ("https://[::ffff:1.1.1.1]/hook", []),
        ("https://[64:ff9b::101:101]/hook", []),  # NAT64 of 1.1.1.1
        ("https://[2002:101:101::1]/hook", []),  # 6to4 of 1.1.1.1
        ("https://[2001:4:112::1]/hook", []),  # AS112-v6: globally reachable, within 2001::/23
        ("https://100.64.0.1/hook", ["100.64.0.0/10"]),
        ("https://[2002:a00:5::]/hook", ["10.0.0.0/8"]),  # judged as the IPv4 address it reaches
        ("https://[64:ff9b:1::a00:5]/hook", ["64:ff9b:1::/48"]),
    ],
)
async def test_public_and_allowed_addresses_pass(url: str, allowed_networks: list[str]) -> None:
    policy = DestinationPolicy(allowed_networks=tuple(ipaddress.ip_network(n) for n in allowed_networks))
    literal = ipaddress.ip_address(URL(url).raw_host or "")
    assert await policy.check(url) == [literal]


async def test_allowed_networks_let_internal_receivers_through(internal_hub: RunningHub) -> None:
    hub = internal_hub
    async with aiohttp.ClientSession(
        base_url=hub.url, connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    ) as client:
        for url in ("https://127.0.0.1:9000/hook", "https://localhost/hook", "https://[::1]/hook"):
            assert (await create(client, hub, url=url))["url"] == url
        assert "10.0.0.5 is a private address" in await refusal(client, hub, "https://10.0.0.5/hook")
        assert "must use https, not http" in await refusal(client, hub, "http://127.0.0.1/hook")


async def test_a_delivery_session_connects_only_where_the_policy_allows(hub: RunningHub) -> None:
    health = URL(hub.url).with_host("localhost") / "api/v1/health"  # a name: the resolver decides
    async with session_to(hub, DestinationPolicy()) as session:
        with pytest.raises(DestinationRefused, match=r"localhost resolves to .*, a loopback address"):
            await session.get(health)
    allowed = DestinationPolicy(allowed_networks=tuple(LOOPBACK))
    async with session_to(hub, allowed) as session, session.get(health) as response:
        assert response.status == 200


def test_allowed_networks_must_be_networks() -> None:
    with pytest.raises(ValidationError, match="webhook_allow"):
        Settings(webhook_allow=["10.0.0.1/8"])


# scopes, bodies, the OpenAPI document -------------------------------------------------------


async def test_webhooks_are_for_admins_only(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    webhook = await create(http, hub)
    path = f"{WEBHOOKS}/{webhook['id']}"
    routes = [("POST", WEBHOOKS), ("GET", WEBHOOKS), ("GET", path), ("PATCH", path), ("DELETE", path),
              ("POST", f"{path}:rotate-secret"), ("POST", f"{path}:test"), ("GET", f"{path}/deliveries"),
              ("POST", f"{path}/deliveries/whd_{'0' * 32}:redeliver")]  # fmt: skip
    for scope in ("hub:read", "hub:write"):
        for method, route in routes:
            status, problem = await call(http, hub, method, route, {"url": RECEIVER}, scope=scope)
            assert (status, problem["required_scope"]) == (403, "hub:admin"), (method, route)
    assert (await call(http, hub, "GET", path))[0] == 200  # still there, unchanged


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"event_types": ["alert_raised"]}, "body.url"),
        ({"url": RECEIVER}, "body.event_types"),
        ({"url": RECEIVER, "event_types": []}, "body.event_types"),
        ({"url": RECEIVER, "event_types": ["score"]}, "body.event_types.0"),
        ({"url": RECEIVER, "event_types": ["alert"]}, "body.event_types.0"),  # the old vocabulary
        ({"url": RECEIVER, "event_types": ["alert_raised"], "min_severity": "SEVERE"}, "body.min_severity"),
        ({"url": RECEIVER, "event_types": ["agent_online"], "min_severity": "HIGH"}, "body.min_severity"),
        ({"url": RECEIVER, "event_types": ["alert_raised"], "enabled": "yes"}, "body.enabled"),
        ({"url": RECEIVER, "event_types": ["alert_raised"], "description": "x" * 501}, "body.description"),
        ({"url": RECEIVER, "event_types": ["alert_raised"], "secret": "mine"}, "body.secret"),
        ({"url": 5, "event_types": ["alert_raised"]}, "body.url"),
    ],
)
async def test_bad_bodies_are_422_naming_the_field(
    hub: RunningHub, http: aiohttp.ClientSession, body: dict[str, Any], location: str
) -> None:
    status, problem = await call(http, hub, "POST", WEBHOOKS, body)
    assert status == 422, problem
    assert problem["errors"][0]["location"] == location
    assert problem["detail"].startswith(location)


async def test_a_malformed_id_is_422_and_an_unknown_one_404(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    status, problem = await call(http, hub, "GET", f"{WEBHOOKS}/42")
    assert (status, problem["errors"][0]["location"]) == (422, "path.webhook_id")
    assert (await call(http, hub, "GET", f"{WEBHOOKS}/{UNKNOWN}"))[0] == 404


async def test_the_openapi_document_lists_the_webhook_routes(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    async with http.get("/api/v1/openapi.json") as response:
        document = await response.json()
    paths = document["paths"]
    assert set(paths[WEBHOOKS]) == {"get", "post"}
    assert set(paths[f"{WEBHOOKS}/{{webhook_id}}"]) == {"get", "patch", "delete"}
    assert set(paths[f"{WEBHOOKS}/{{webhook_id}}:rotate-secret"]) == {"post"}
    assert set(paths[f"{WEBHOOKS}/{{webhook_id}}:test"]) == {"post"}
    assert set(paths[f"{WEBHOOKS}/{{webhook_id}}/deliveries"]) == {"get"}
    assert set(paths[f"{WEBHOOKS}/{{webhook_id}}/deliveries/{{delivery_id}}:redeliver"]) == {"post"}
    operations = [op for methods in paths.values() for op in methods.values() if op["tags"] == ["webhooks"]]
    assert len(operations) == 9
    assert {op["x-required-scope"] for op in operations} == {"hub:admin"}
    schemas = document["components"]["schemas"]
    assert "secret" not in schemas["WebhookView"]["properties"]
    assert "secret" in schemas["WebhookWithSecret"]["required"]
    assert "deliveries" in schemas["WebhookView"]["required"]
    event_types = schemas["WebhookView"]["properties"]["event_types"]["items"]["enum"]
    assert sorted(event_types) == ["agent_offline", "agent_online", "alert_raised", "certificate_expiring",
                                   "certificate_revoked", "risk_threshold_crossed"]  # fmt: skip
    patch = paths[f"{WEBHOOKS}/{{webhook_id}}"]["patch"]
    assert patch["requestBody"]["required"] is False


@pytest.mark.parametrize("variable", ["HUB_WEBHOOK_ALLOW", "HUB_WEBHOOK_ALLOWED_NETWORKS"])
def test_the_allow_list_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, '["127.0.0.0/8", "::1/128"]')
    assert Settings().webhook_allow == [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
