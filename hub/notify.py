"""Notifications: webhook subscriptions, and the guard on where a delivery may go.

A subscription (GitHub's repository hooks and Stripe's webhook endpoints are the models):

- `id`: made by the hub, `wh_` and 32 hex digits.
- `url`: where deliveries are POSTed. `DestinationPolicy` checks it whenever it is set, and
  deliveries check it again at every attempt (a name may resolve elsewhere tomorrow).
- `event_types`: what it receives, a non-empty subset of `hub.notices.EventType`, kept sorted:
  `alert_raised`, `risk_threshold_crossed` (an alert a risk threshold raised, announced as
  both), `agent_online`, `agent_offline`, `certificate_expiring`, `certificate_revoked`.
  Per-process `score` updates, which the dashboards get, are not offered: under load they come
  many times a second, and a score crossing a threshold is what a receiver acts on.
- `min_severity`: only alerts at least this severe; it filters the alert types, so it needs one.
- Routes, each optional, null for none: `rule_ids`, `tags` (any of them), `severities` (alert
  filters, so they need an alert type too) and `agent_groups` (groups of `HUB_AGENT_GROUPS`, whose
  agent id globs must match the alert's or the presence or certificate event's agent). A notice
  reaches a subscription only if every filter it has matches; they are stored as `routes`.
- `enabled`: a disabled subscription keeps its settings and receives nothing.
- `secret`: made by the hub and shown only in the answers that make it (creation, rotation);
  every delivery carries an HMAC-SHA256 of its body with it. A rotation may let the replaced
  secret keep signing beside the new one until `previous_secret_expires_at` (Stripe's rolling
  secrets), so a receiver switches over without refusing deliveries meanwhile.
- `created_at`, `updated_at`, `created_by` (the token's subject).
- `deliveries`: a summary of its outbox (`hub.deliveries` sends it): pending and dead counts,
  the status and time of the last attempt.

The destination guard refuses, at subscription time and again at delivery time, what would
let a webhook reach inside the hub's network (server-side request forgery): schemes other
than https (http too when allowed), user names or passwords in the URL, hosts that are not
valid names or IP addresses, and any address that is not public, whether written as an IP
literal or among the addresses a name resolves to. What is public follows IANA's IPv4 and IPv6
special-purpose address registries, written out in `_KINDS` rather than taken from `ipaddress`'s
`is_global` / `is_private`: those answers change between Python releases and have let through
ranges that lead inside (local-use NAT64, site-local, IPv4-translated, IPv4-compatible). Refused
are loopback, private and unique-local, link-local (cloud metadata at 169.254.169.254), shared
(carrier-grade NAT), multicast, broadcast, unspecified, "this network", reserved, documentation,
benchmarking, discard-only, Teredo, the local-use NAT64 prefix 64:ff9b:1::/48 (its IPv4 mapping
is each network's own), IETF protocol assignments (all of 192.0.0.0/24, and 2001::/23 but for
its globally reachable unicast ranges: anycast services there, such as PCP at 192.0.0.9 and
2001:1::1, are answered by the nearest server, which may be inside), and IPv6 outside 2000::/3.
IPv4 addresses inside IPv6 (mapped ::ffff:0:0/96, well-known NAT64 64:ff9b::/96, 6to4
2002::/16) are judged as the IPv4 address they reach: a 6to4 address of a public IPv4 address
is a 6to4 site reached through a relay, one of 10.0.0.5 leads to 10.0.0.5. Networks in
`webhook_allow` are allowed anyway: that is how an internal receiver is reached.
URLs are read with yarl, as aiohttp will read them when it sends.
"""

from __future__ import annotations

import asyncio
import builtins
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp.abc import AbstractResolver, ResolveResult
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11
from yarl import URL

from hub.config import Settings
from hub.models import Severity
from hub.notices import ALERT_TYPES, EventType, ping_notice
from hub.problems import Conflict, InvalidInput, NotFound
from hub.store import Page, Store

WEBHOOK_ID_PATTERN = r"^wh_[0-9a-f]{32}$"
DELIVERY_ID_PATTERN = r"^whd_[0-9a-f]{32}$"
DeliveryState = Literal["pending", "delivered", "dead"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ALLOW_HINT = "allow it with HUB_WEBHOOK_ALLOW"
# A DNS name as resolvers take it: labels of 1-63 letters, digits, '-' or '_' (seen on internal
# names), no '-' at either end, 253 characters at most, an optional final dot.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}\.?$)(?:{_LABEL}\.)*{_LABEL}\.?$")
# A numeric last label (127.1, 2130706433, 0x7f.1) is a legacy IPv4 form, never a name.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# What an address is: the first range holding it says, None meaning public (see the module
# docstring). The last ranges of each version hold every address, so one always answers.
_KINDS: tuple[tuple[IPNetwork, str | None], ...] = tuple(
    (ipaddress.ip_network(network), kind)
    for network, kind in (
        ("0.0.0.0/32", "an unspecified"),
        ("0.0.0.0/8", "a 'this network'"),
        ("10.0.0.0/8", "a private"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "a loopback"),
        ("169.254.0.0/16", "a link-local"),
        ("172.16.0.0/12", "a private"),
        ("192.0.0.0/24", "an IETF protocol assignment"),
        ("192.0.2.0/24", "a documentation"),
        ("192.88.99.0/24", "a 6to4 relay anycast"),  # deprecated by RFC 7526
        ("192.168.0.0/16", "a private"),
        ("198.18.0.0/15", "a benchmarking"),
        ("198.51.100.0/24", "a documentation"),
        ("203.0.113.0/24", "a documentation"),
        ("224.0.0.0/4", "a multicast"),
        ("255.255.255.255/32", "a broadcast"),
        ("240.0.0.0/4", "a reserved"),
        ("0.0.0.0/0", None),
        ("::/128", "an unspecified"),
        ("::1/128", "a loopback"),
        ("::/96", "a deprecated IPv4-compatible"),
        ("::ffff:0:0:0/96", "an IPv4-translated"),
        ("64:ff9b:1::/48", "a local-use NAT64"),
        ("100::/64", "a discard-only"),
        ("2001:3::/32", None),  # AMT relays: 2001::/23's globally reachable unicast ranges
        ("2001:4:112::/48", None),  # AS112-v6
        ("2001:20::/28", None),  # ORCHIDv2
        ("2001:30::/28", None),  # drone remote ID
        ("2001::/32", "a Teredo"),
        ("2001::/23", "an IETF protocol assignment"),
        ("2001:db8::/32", "a documentation"),
        ("3fff::/20", "a documentation"),
        ("2000::/3", None),  # global unicast: IANA allocates from nothing else
        ("fc00::/7", "a private"),
        ("fe80::/10", "a link-local"),
        ("fec0::/10", "a deprecated site-local"),
        ("ff00::/8", "a multicast"),
        ("::/0", "a reserved"),
    )
)


class DestinationRefused(ValueError):
    """A webhook URL, or an address it leads to, that the hub must not send to; says why."""


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Where webhook deliveries may go (see the module docstring)."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_http: bool = False
    max_url_chars: int = 2048
    resolve_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DestinationPolicy:
        return cls(
            allowed_networks=tuple(settings.webhook_allow),
            allow_http=settings.webhook_allow_http,
            max_url_chars=settings.webhook_max_url_chars,
            resolve_timeout_s=settings.webhook_resolve_timeout_s,
        )

    async def check(self, url: str) -> list[IPAddress]:
        """Refuse `url` unless every address it leads to may be reached; return those addresses."""
        parsed = self.parse(url)
        assert parsed.raw_host is not None  # parse checked it
        assert parsed.port is not None  # yarl gives the scheme's default
        return await self.resolve(parsed.raw_host, parsed.port)

    def parse(self, url: str) -> URL:
        """Read `url` as aiohttp will, refusing what no delivery may use whatever it resolves to."""
        if len(url) > self.max_url_chars:
            raise DestinationRefused(
                f"has {len(url)} characters; the limit is {self.max_url_chars} (HUB_WEBHOOK_MAX_URL_CHARS)"
            )
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            raise DestinationRefused(f"is not a valid URL: {exc}") from None
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise DestinationRefused(
                "must not carry a user name or password: deliveries are authenticated by their signature"
            )
        schemes = ("https", "http") if self.allow_http else ("https",)
        if not parsed.scheme:
            raise DestinationRefused(f"has no scheme; start it with {schemes[0]}://")
        if parsed.scheme not in schemes:
            hint = " (HUB_WEBHOOK_ALLOW_HTTP=true allows plain http)" if parsed.scheme == "http" else ""
            raise DestinationRefused(f"must use {' or '.join(schemes)}, not {parsed.scheme}{hint}")
        host = parsed.raw_host
        if not host:
            raise DestinationRefused("has no host")
        if parsed.port == 0:
            raise DestinationRefused("port 0 cannot be connected to")
        if _ip_literal(host) is None:
            if not _HOST_NAME.match(host):
                raise DestinationRefused(f"host {host!r} is neither a valid host name nor an IP address")
            if _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
                raise DestinationRefused(f"host {host!r} is not a canonical IP address")
        return parsed

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Return the addresses `host` leads to, refusing it if any of them may not be reached."""
        literal = _ip_literal(host)
        if literal is not None:
            if why := self.refusal(literal):
                raise DestinationRefused(f"{_shown(literal)} is {why}; {_ALLOW_HINT}")
            return [literal]
        addresses = await self._lookup(host, port)
        for address in addresses:
            # All or nothing: whoever controls the name's DNS chooses which address is used.
            if why := self.refusal(address):
                raise DestinationRefused(f"{host} resolves to {_shown(address)}, {why}; {_ALLOW_HINT}")
        return addresses

    def refusal(self, address: IPAddress) -> str | None:
        """Say what kind of address `address` is when it may not be reached; None when it may."""
        reached = _ipv4_inside(address) or address
        if any(candidate in network for candidate in (address, reached) for network in self.allowed_networks):
            return None
        kind = next(kind for network, kind in _KINDS if reached in network)
        return None if kind is None else f"{kind} address"

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise DestinationRefused(f"{host} did not resolve within {self.resolve_timeout_s:g} s") from None
        except OSError as exc:
            raise DestinationRefused(f"{host} does not resolve ({exc.strerror or exc})") from None
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _shown(address: IPAddress) -> str:
    inside = _ipv4_inside(address)
    return f"{address} (IPv4 {inside})" if inside else str(address)


def _ipv4_inside(address: IPAddress) -> ipaddress.IPv4Address | None:
    # A dual-stack socket connects ::ffff:10.0.0.5 to 10.0.0.5; a NAT64 gateway does the same
    # with 64:ff9b::a00:5, and a 6to4 relay (or the hub's own 6to4 tunnel) with 2002:a00:5::.
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver for delivery sessions: it answers only addresses the policy allows.

    Checking when connecting, on the very addresses connected to, defeats DNS rebinding (a
    name that resolved to a public address when checked and to 10.0.0.5 when used). aiohttp
    asks no resolver about IP literals, so deliveries also `check` the URL before sending, and
    follow no redirects.
    """

    def __init__(self, policy: DestinationPolicy) -> None:
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = []
        for address in await self._policy.resolve(host, port):
            address_family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            if family in (socket.AF_UNSPEC, address_family):
                flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
                found.append(
                    ResolveResult(
                        hostname=host,
                        host=str(address),
                        port=port,
                        family=address_family,
                        proto=0,
                        flags=flags,
                    )
                )
        if not found:
            raise OSError(f"{host} has no {family.name} address")
        return found

    async def close(self) -> None:
        """Release nothing: lookups use the event loop's getaddrinfo."""


# subscriptions -----------------------------------------------------------------------------


class DeliverySummary(TypedDict):
    """How a subscription's deliveries stand."""

    pending: int
    dead: int  # waiting for an operator to redeliver them
    last_status: int | None  # the HTTP status of the last attempt; null when it got no answer
    last_delivery_at: float | None  # when the last attempt started


class DeliveryView(TypedDict):
    """One delivery of the outbox: every attempt sends the same body under its `id`."""

    id: str
    event_type: EventType | Literal["ping"]
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None  # pending only
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None


_NO_DELIVERIES = DeliverySummary(pending=0, dead=0, last_status=None, last_delivery_at=None)


class WebhookView(TypedDict):
    """A subscription as the API shows it: everything but its secrets."""

    id: str
    url: str
    description: str | None
    event_types: list[EventType]
    min_severity: Severity | None
    rule_ids: list[str] | None
    tags: list[str] | None
    severities: list[Severity] | None
    agent_groups: list[str] | None
    enabled: bool
    previous_secret_expires_at: float | None  # until then the replaced secret signs too
    created_at: float
    updated_at: float
    created_by: str
    deliveries: DeliverySummary


class WebhookWithSecret(WebhookView):
    """A subscription with its new secret: the answer to creation and rotation, and only to them."""

    secret: str


def webhook_view(record: Mapping[str, Any], deliveries: DeliverySummary = _NO_DELIVERIES) -> WebhookView:
    """Show a stored subscription without its secrets, with the summary of its deliveries."""
    return WebhookView(
        id=record["id"],
        url=record["url"],
        description=record["description"],
        event_types=record["event_types"],
        min_severity=record["min_severity"],
        rule_ids=record["routes"].get("rule_ids"),
        tags=record["routes"].get("tags"),
        severities=record["routes"].get("severities"),
        agent_groups=record["routes"].get("agent_groups"),
        enabled=record["enabled"],
        previous_secret_expires_at=record["previous_secret_expires_at"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        created_by=record["created_by"],
        deliveries=deliveries,
    )


def _with_secret(view: WebhookView, record: Mapping[str, Any]) -> WebhookWithSecret:
    return WebhookWithSecret(**view, secret=record["secret"])


def _invalid(field: str, message: str) -> InvalidInput:
    # The same shape as the API's own validation errors: the detail and `errors` name the field.
    return InvalidInput(
        f"body.{field}: {message}", errors=[{"location": f"body.{field}", "message": message}]
    )


ROUTE_FIELDS = ("rule_ids", "tags", "severities", "agent_groups")
_ALERT_FILTERS = ("min_severity", "rule_ids", "tags", "severities")


def _routes(current: Mapping[str, list[str]], changes: Mapping[str, Any]) -> dict[str, list[str]]:
    # Only the filters given change; null clears one. The stored object keeps only those set.
    routes = {**current, **{name: changes[name] for name in ROUTE_FIELDS if name in changes}}
    return {name: value for name, value in routes.items() if value is not None}


def _check_filters(record: Mapping[str, Any], agent_groups: Mapping[str, list[str]]) -> None:
    filters = {"min_severity": record["min_severity"], **record["routes"]}
    alert_filter = next((name for name in _ALERT_FILTERS if filters.get(name) is not None), None)
    if alert_filter is not None and not ALERT_TYPES & set(record["event_types"]):
        raise _invalid(
            alert_filter,
            "filters alerts only: add alert_raised or risk_threshold_crossed to event_types or leave it out",
        )
    unknown = sorted(set(record["routes"].get("agent_groups", ())) - set(agent_groups))
    if unknown:
        known = ", ".join(sorted(agent_groups)) or "none"
        raise _invalid("agent_groups", f"no agent group {', '.join(unknown)} (HUB_AGENT_GROUPS has {known})")


class Webhooks:
    """Create, read, change, delete subscriptions, rotate their secrets, show and redo their deliveries."""

    def __init__(self, settings: Settings, store: Store, wake: Callable[[], None]) -> None:
        self._store = store
        self._wake = wake  # tells the sender a delivery was queued here
        self._policy = DestinationPolicy.from_settings(settings)
        self._max_count = settings.webhook_max_subscriptions
        self._max_overlap_s = settings.webhook_max_secret_overlap_s
        self._agent_groups = settings.agent_groups

    async def create(
        self,
        *,
        url: str,
        event_types: list[EventType],
        min_severity: Severity | None,
        routes: Mapping[str, list[str] | None],
        description: str | None,
        enabled: bool,
        created_by: str,
    ) -> WebhookWithSecret:
        """Store a new subscription with a new secret, once its URL passes the guard."""
        await self._check_url(url)
        now = time.time()
        record = {
            "id": "wh_" + secrets.token_hex(16),
            "url": url,
            "description": description,
            "event_types": event_types,
            "min_severity": min_severity,
            "routes": _routes({}, routes),
            "enabled": enabled,
            "secret": "whsec_" + secrets.token_urlsafe(32),
            "previous_secret": None,
            "previous_secret_expires_at": None,
            "created_at": now,
            "updated_at": now,
            "created_by": created_by,
        }
        _check_filters(record, self._agent_groups)
        if not await self._store.insert_webhook(record, max_count=self._max_count):
            raise Conflict(
                f"the hub keeps at most {self._max_count} webhook subscriptions "
                "(HUB_WEBHOOK_MAX_SUBSCRIPTIONS); delete one first"
            )
        return _with_secret(webhook_view(record), record)

    async def get(self, webhook_id: str) -> WebhookView:
        """Return one subscription, without its secrets."""
        return await self._view(await self._known(webhook_id))

    async def list(self, *, after: list[Any] | None, limit: int) -> Page:
        """Return subscriptions in creation order, without their secrets."""
        page = await self._store.list_webhooks(after=after, limit=limit)
        summaries = await self._store.delivery_summaries([record["id"] for record in page.items])
        views = [dict(webhook_view(record, _summary(summaries[record["id"]]))) for record in page.items]
        return Page(views, page.next_key)

    async def update(self, webhook_id: str, changes: dict[str, Any]) -> WebhookView:
        """Change the given fields only; a new URL passes the guard first."""
        if not changes:
            return await self.get(webhook_id)
        if "url" in changes:
            await self._check_url(changes["url"])
        now = time.time()

        def change(current: dict[str, Any]) -> dict[str, Any]:
            columns = {name: value for name, value in changes.items() if name not in ROUTE_FIELDS}
            if any(name in changes for name in ROUTE_FIELDS):
                columns["routes"] = _routes(current["routes"], changes)
            # Against the stored state, in the same transaction.
            _check_filters({**current, **columns}, self._agent_groups)
            return {**columns, "updated_at": now}

        return await self._view(await self._change(webhook_id, change))

    async def rotate_secret(self, webhook_id: str, *, keep_previous_s: float) -> WebhookWithSecret:
        """Give the subscription a new secret; the replaced one signs too for `keep_previous_s`."""
        if keep_previous_s > self._max_overlap_s:
            raise _invalid(
                "keep_previous_s",
                f"must be at most {self._max_overlap_s:g} s (HUB_WEBHOOK_MAX_SECRET_OVERLAP_S)",
            )
        secret, now = "whsec_" + secrets.token_urlsafe(32), time.time()

        def rotate(current: dict[str, Any]) -> dict[str, Any]:
            # Only the latest replaced secret is kept: rotating twice retires the oldest at once.
            keep = keep_previous_s > 0
            return {
                "secret": secret,
                "previous_secret": current["secret"] if keep else None,
                "previous_secret_expires_at": now + keep_previous_s if keep else None,
                "updated_at": now,
            }

        record = await self._change(webhook_id, rotate)
        return _with_secret(await self._view(record), record)

    async def delete(self, webhook_id: str) -> None:
        """Delete a subscription: it receives nothing from now on."""
        if not await self._store.delete_webhook(webhook_id):
            raise NotFound(f"no webhook {webhook_id}")

    async def list_deliveries(
        self, webhook_id: str, *, state: DeliveryState | None, after: builtins.list[Any] | None, limit: int
    ) -> Page:
        """Return a subscription's deliveries, newest first."""
        await self._known(webhook_id)
        return await self._store.list_deliveries(webhook_id, state=state, after=after, limit=limit)

    async def test(self, webhook_id: str) -> DeliveryView:
        """Queue a `ping` delivery to the subscription now, whatever it subscribes to."""
        now = time.time()
        delivery = await self._store.enqueue_delivery(webhook_id, ping_notice(webhook_id, now), now)
        if delivery is None:
            raise NotFound(f"no webhook {webhook_id}")
        self._wake()
        return _delivery(delivery)

    async def redeliver(self, webhook_id: str, delivery_id: str) -> DeliveryView:
        """Send a delivered or dead delivery again, same body and id, its attempts counted afresh."""
        await self._known(webhook_id)
        found = await self._store.redeliver(webhook_id, delivery_id, time.time())
        if found is None:
            raise NotFound(f"webhook {webhook_id} has no delivery {delivery_id}")
        delivery, changed = found
        if not changed:
            raise Conflict(f"delivery {delivery_id} is pending already: it is sent again without asking")
        self._wake()
        return _delivery(delivery)

    async def _known(self, webhook_id: str) -> dict[str, Any]:
        record = await self._store.get_webhook(webhook_id)
        if record is None:
            raise NotFound(f"no webhook {webhook_id}")
        return record

    async def _view(self, record: Mapping[str, Any]) -> WebhookView:
        summaries = await self._store.delivery_summaries([record["id"]])
        return webhook_view(record, _summary(summaries[record["id"]]))

    async def _change(
        self, webhook_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        record = await self._store.update_webhook(webhook_id, change)
        if record is None:
            raise NotFound(f"no webhook {webhook_id}")
        return record

    async def _check_url(self, url: str) -> None:
        try:
            await self._policy.check(url)
        except DestinationRefused as refused:
            raise _invalid("url", str(refused)) from None


def _summary(row: Mapping[str, Any]) -> DeliverySummary:
    return DeliverySummary(
        pending=int(row["pending"]),
        dead=int(row["dead"]),
        last_status=row["last_status"],
        last_delivery_at=row["last_delivery_at"],
    )


def _delivery(row: Mapping[str, Any]) -> DeliveryView:
    return DeliveryView(
        id=row["id"], event_type=row["event_type"], state=row["state"], attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"], last_attempt_at=row["last_attempt_at"],
        last_status=row["last_status"], last_error=row["last_error"], created_at=row["created_at"],
        delivered_at=row["delivered_at"],
    )  # fmt: skip
