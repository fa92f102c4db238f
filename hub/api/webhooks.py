"""Webhook subscriptions: create, list, get, change, delete, rotate the signing secret; their deliveries.

Every route needs `hub:admin`: a webhook's URL and secret let whoever holds them receive the
hub's alerts, or forge them. What may be subscribed to, where a webhook may point and how
secrets work are `hub.notify`'s rules; this module only translates HTTP to `Webhooks` calls.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import MISSING, AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.spec import ApiRoutes, json_response
from hub.keys import PRINCIPAL, WEBHOOKS
from hub.models import Severity
from hub.notices import EventType
from hub.notify import (
    DELIVERY_ID_PATTERN,
    ROUTE_FIELDS,
    WEBHOOK_ID_PATTERN,
    DeliveryState,
    DeliveryView,
    Webhooks,
    WebhookView,
    WebhookWithSecret,
)
from hub.rules import RULE_ID_PATTERN

api = ApiRoutes("webhooks")


_Name = TypeVar("_Name", bound=str)


def _sorted_unique(values: list[_Name]) -> list[_Name]:
    return sorted(set(values))


WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        description="where deliveries are POSTed: https, to a public address unless the hub's "
        "HUB_WEBHOOK_ALLOW allows its network; no user name or password",
    ),
]
EventTypes = Annotated[
    list[EventType],
    Field(
        min_length=1,
        description="what it receives: alert_raised, risk_threshold_crossed, agent_online, agent_offline, "
        "certificate_expiring, certificate_revoked",
    ),
    AfterValidator(_sorted_unique),
]
MinSeverity = Annotated[
    Severity,
    Field(description="only alerts at least this severe (needs alert_raised or risk_threshold_crossed)"),
]
Name = Annotated[str, Field(min_length=1, max_length=64)]
RuleIds = Annotated[
    list[Annotated[str, Field(pattern=f"^{RULE_ID_PATTERN.pattern}$")]],
    Field(
        min_length=1,
        max_length=100,
        description="only alerts of these rules (risk-threshold-80 and the like too)",
    ),
    AfterValidator(_sorted_unique),
]
Tags = Annotated[
    list[Name],
    Field(min_length=1, max_length=100, description="only alerts carrying at least one of these rule tags"),
    AfterValidator(_sorted_unique),
]
Severities = Annotated[
    list[Severity],
    Field(min_length=1, description="only alerts of these severities"),
    AfterValidator(_sorted_unique),
]
AgentGroups = Annotated[
    list[Name],
    Field(
        min_length=1,
        max_length=100,
        description="only alerts, presence and certificate events of agents in these HUB_AGENT_GROUPS",
    ),
    AfterValidator(_sorted_unique),
]
Description = Annotated[str, Field(max_length=500, description="what it is for, for the next person")]
Enabled = Annotated[StrictBool, Field(description="false keeps the subscription but delivers nothing")]


class CreateWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    event_types: EventTypes
    min_severity: MinSeverity | None = None
    rule_ids: RuleIds | None = None
    tags: Tags | None = None
    severities: Severities | None = None
    agent_groups: AgentGroups | None = None
    description: Description | None = None
    enabled: Enabled = True


class UpdateWebhook(BaseModel):
    """Only the fields present change; null clears an optional one (a filter, `description`)."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl | MISSING = MISSING
    event_types: EventTypes | MISSING = MISSING
    min_severity: MinSeverity | MISSING | None = MISSING
    rule_ids: RuleIds | MISSING | None = MISSING
    tags: Tags | MISSING | None = MISSING
    severities: Severities | MISSING | None = MISSING
    agent_groups: AgentGroups | MISSING | None = MISSING
    description: Description | MISSING | None = MISSING
    enabled: Enabled | MISSING = MISSING


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keep_previous_s: float = Field(
        0.0,
        ge=0,
        description="seconds the replaced secret keeps signing deliveries beside the new one, "
        "so receivers can switch over (0: replaced at once)",
    )


class WebhookPath(BaseModel):
    webhook_id: str = Field(pattern=WEBHOOK_ID_PATTERN, description="the webhook's id")


class DeliveryPath(WebhookPath):
    delivery_id: str = Field(pattern=DELIVERY_ID_PATTERN, description="the delivery's id")


class DeliveryQuery(PageQuery):
    state: DeliveryState | None = Field(None, description="only deliveries in this state")


def _webhooks(request: web.Request) -> Webhooks:
    return request.app[WEBHOOKS]


@api.post(
    "/api/v1/webhooks",
    scope="hub:admin",
    body=CreateWebhook,
    response=WebhookWithSecret,
    status=201,
    no_store=True,
)
async def create_webhook(request: web.Request, *, body: CreateWebhook) -> web.Response:
    """Subscribe a URL to hub events; the answer carries its signing secret, shown only now.

    The URL must use https (http only when the hub allows it), carry no user name or password,
    and lead only to public addresses: an IP literal, or a name every address of which is
    public, unless HUB_WEBHOOK_ALLOW allows it. A refused URL is a 422 saying why.
    Routes (`rule_ids`, `tags`, `severities`, `agent_groups`) narrow what it receives: every
    filter given must match.
    """
    webhook = await _webhooks(request).create(
        url=body.url,
        event_types=body.event_types,
        min_severity=body.min_severity,
        routes={name: getattr(body, name) for name in ROUTE_FIELDS},
        description=body.description,
        enabled=body.enabled,
        created_by=request[PRINCIPAL].subject,
    )
    return json_response(webhook, status=201, headers={"Location": f"/api/v1/webhooks/{webhook['id']}"})


@api.get("/api/v1/webhooks", scope="hub:admin", query=PageQuery, response=PageOf[WebhookView])
async def list_webhooks(request: web.Request, *, query: PageQuery) -> dict[str, Any]:
    """List webhook subscriptions, oldest first, without their secrets."""
    return await paginate(request, query, _webhooks(request).list)


@api.get("/api/v1/webhooks/{webhook_id}", scope="hub:admin", path_params=WebhookPath, response=WebhookView)
async def get_webhook(request: web.Request, *, path: WebhookPath) -> WebhookView:
    """Get one webhook subscription, without its secret."""
    return await _webhooks(request).get(path.webhook_id)


@api.patch(
    "/api/v1/webhooks/{webhook_id}",
    scope="hub:admin",
    path_params=WebhookPath,
    body=UpdateWebhook,
    response=WebhookView,
)
async def update_webhook(request: web.Request, *, path: WebhookPath, body: UpdateWebhook) -> WebhookView:
    """Change a webhook subscription: only the fields sent change (null clears an optional one).

    A new URL is checked as on creation. The secret changes only by rotation.
    """
    return await _webhooks(request).update(path.webhook_id, body.model_dump(exclude_unset=True))


@api.delete("/api/v1/webhooks/{webhook_id}", scope="hub:admin", path_params=WebhookPath, status=204)
async def delete_webhook(request: web.Request, *, path: WebhookPath) -> None:
    """Delete a webhook subscription: it receives nothing from now on."""
    await _webhooks(request).delete(path.webhook_id)


@api.post(
    "/api/v1/webhooks/{webhook_id}:rotate-secret",
    scope="hub:admin",
    path_params=WebhookPath,
    body=RotateSecret,
    response=WebhookWithSecret,
    no_store=True,
)
async def rotate_webhook_secret(
    request: web.Request, *, path: WebhookPath, body: RotateSecret
) -> WebhookWithSecret:
    """Give a webhook a new signing secret, shown only in this answer.

    With `keep_previous_s`, deliveries are signed with both secrets until
    `previous_secret_expires_at`, so the receiver can switch over without refusing any
    (at most HUB_WEBHOOK_MAX_SECRET_OVERLAP_S). Rotating again retires the older secret at once.
    """
    return await _webhooks(request).rotate_secret(path.webhook_id, keep_previous_s=body.keep_previous_s)


@api.get(
    "/api/v1/webhooks/{webhook_id}/deliveries",
    scope="hub:admin",
    path_params=WebhookPath,
    query=DeliveryQuery,
    response=PageOf[DeliveryView],
)
async def list_webhook_deliveries(
    request: web.Request, *, path: WebhookPath, query: DeliveryQuery
) -> dict[str, Any]:
    """List a webhook's deliveries, newest first: pending (to be sent or retried), delivered, or dead.

    A dead delivery failed every attempt (HUB_WEBHOOK_MAX_ATTEMPTS); `last_error` says why the
    last one failed. Redeliver it once the receiver is fixed.
    """
    return await paginate(
        request, query, _webhooks(request).list_deliveries, path.webhook_id, state=query.state
    )


@api.post(
    "/api/v1/webhooks/{webhook_id}:test",
    scope="hub:admin",
    path_params=WebhookPath,
    response=DeliveryView,
    status=202,
)
async def test_webhook(request: web.Request, *, path: WebhookPath) -> DeliveryView:
    """Queue a `ping` delivery to the webhook now, whatever events it subscribes to.

    It is signed and retried like every delivery; follow it in the webhook's deliveries.
    """
    return await _webhooks(request).test(path.webhook_id)


@api.post(
    "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}:redeliver",
    scope="hub:admin",
    path_params=DeliveryPath,
    response=DeliveryView,
)
async def redeliver_webhook_delivery(request: web.Request, *, path: DeliveryPath) -> DeliveryView:
    """Send a dead or delivered delivery again: the same body and delivery id, attempts counted afresh.

    A pending delivery is a 409: it is being sent already.
    """
    return await _webhooks(request).redeliver(path.webhook_id, path.delivery_id)
