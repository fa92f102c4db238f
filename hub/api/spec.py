"""The API's route tables: each route declared once with its scope and models.

A handler is registered with the pydantic models of its path parameters, query, body and
answer. The table parses and validates the request before the handler runs (a clear 422
naming the field otherwise), renders what the handler returns as JSON, and is the only
source of the OpenAPI document (`openapi_document`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.json_schema import JsonSchemaMode

from hub.api.auth import requires
from hub.api.bodies import read_json
from hub.api.signatures import AGENT_SIGNATURE
from hub.problems import PROBLEM_SCHEMA, InvalidInput

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
_PATH_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"
_SIGNATURE_HEADERS = [
    {"name": "X-Agent-ID", "in": "header", "required": True, "schema": {"type": "string"}},
    {"name": "X-Agent-Timestamp", "in": "header", "required": True, "schema": {"type": "string"}},
]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: what it needs, what it reads and what it answers."""

    method: str
    path: str
    name: str
    summary: str
    description: str
    tag: str
    scope: str | None
    path_params: type[BaseModel] | None
    query: type[BaseModel] | None
    body: type[BaseModel] | None
    raw_body: Any  # described, not parsed: the handler reads the body itself (JSON or msgpack)
    response: Any
    status: int
    also: dict[int, str]  # other success statuses answering with the same shape
    endpoint: Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiRoutes:
    """Like aiohttp's `RouteTableDef`, plus the scope and models of every route."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.routes: list[Route] = []

    def get(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **options)

    def post(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **options)

    def put(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **options)

    def patch(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **options)

    def route(
        self,
        method: str,
        path: str,
        *,
        scope: str | None,
        response: Any = None,
        path_params: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None,
        raw_body: Any = None,
        status: int = 200,
        also: dict[int, str] | None = None,
        no_store: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register `handler(request, *, path=..., query=..., body=...)` for `method path`.

        The handler returns a JSON-able value (pydantic models included) sent with `status`,
        or a ready `web.StreamResponse`; it raises `HubError`s for everything else. `no_store`
        marks answers that carry a secret: never cached, by proxies or by Idempotency-Key replays.
        """
        names = set(_PATH_PARAM.findall(path))
        declared = set(path_params.model_fields) if path_params else set()
        if names != declared:
            raise TypeError(f"{method} {path}: path parameters {sorted(names)} need a model declaring them")

        def register(handler: Handler) -> Handler:
            endpoint = _endpoint(handler, path_params, query, body, status, no_store)
            requires(scope)(endpoint)
            doc = (handler.__doc__ or handler.__name__).strip()
            summary, _, description = doc.partition("\n")
            self.routes.append(
                Route(
                    method, path, handler.__name__, summary.strip(), description.strip(), self.tag, scope,
                    path_params, query, body, raw_body, response, status, also or {}, endpoint,
                )
            )  # fmt: skip
            return handler

        return register

    def add_to(self, app: web.Application) -> None:
        """Add every route of this table to `app`."""
        for route in self.routes:
            app.router.add_route(route.method, route.path, route.endpoint)


def _endpoint(
    handler: Callable[..., Awaitable[Any]],
    path_params: type[BaseModel] | None,
    query: type[BaseModel] | None,
    body: type[BaseModel] | None,
    status: int,
    no_store: bool,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @functools.wraps(handler)
    async def endpoint(request: web.Request) -> web.StreamResponse:
        arguments: dict[str, Any] = {}
        if path_params is not None:
            arguments["path"] = _validate(path_params, dict(request.match_info), "path")
        if query is not None:
            arguments["query"] = _validate(query, dict(request.query), "query")
        if body is not None:
            arguments["body"] = _validate(body, await read_json(request), "body")
        result = await handler(request, **arguments)
        if isinstance(result, web.StreamResponse):
            response = result
        elif status == 204:
            response = web.Response(status=204)
        else:
            response = json_response(result, status=status)
        if no_store:
            response.headers["Cache-Control"] = "no-store"
        return response

    return endpoint


def json_response(value: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Render `value` (pydantic models, TypedDicts, plain data) as a JSON response."""
    return web.Response(
        body=orjson.dumps(value, default=_jsonable),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def _validate(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"location": ".".join([where, *map(str, error["loc"])]), "message": error["msg"]}
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidInput(f"{first['location']}: {first['message']}{more}", errors=errors) from None


# OpenAPI ---------------------------------------------------------------------------------

_ERRORS = {
    400: "Bad request (e.g. a cursor this hub did not issue)",
    401: "Missing, invalid, expired or revoked token",
    403: "The token lacks the scope this operation needs",
    404: "Not found",
    409: "Conflict with the resource's current state",
    413: "Body too large",
    415: "Body is not application/json",
    422: "Invalid input; `errors` lists every field",
    429: "Rate limit exceeded; see Retry-After",
    500: "Internal error (details are in the hub log, never in the answer)",
    503: "Temporarily unavailable; see Retry-After",
}


def openapi_document(tables: Iterable[ApiRoutes], *, title: str, version: str) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of every route in `tables`."""
    routes = [route for table in tables for route in table.routes]
    inputs: list[tuple[tuple[str, str], JsonSchemaMode, TypeAdapter[Any]]] = []
    for route in routes:
        if route.response is not None:
            inputs.append(((route.name, "response"), "serialization", TypeAdapter(route.response)))
        if route.body is not None or route.raw_body is not None:
            inputs.append(((route.name, "body"), "validation", TypeAdapter(route.body or route.raw_body)))
    schemas, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    components = {"Problem": PROBLEM_SCHEMA, **definitions.get("$defs", {})}

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary,
            "tags": [route.tag],
            "parameters": _parameters(route.path_params, "path", components)
            + _parameters(route.query, "query", components),
            "responses": _responses(route, schemas),
        }
        if route.description:
            operation["description"] = route.description
        if route.scope is None:
            operation["security"] = []
        elif route.scope == AGENT_SIGNATURE:
            operation["security"] = [{"agentSignature": []}]
            operation["parameters"] += _SIGNATURE_HEADERS
        else:
            operation["security"] = [{"bearerAuth": [route.scope]}]
            operation["x-required-scope"] = route.scope
        if route.body is not None:
            operation["requestBody"] = {
                "required": any(field.is_required() for field in route.body.model_fields.values()),
                "content": {"application/json": {"schema": schemas[((route.name, "body"), "validation")]}},
            }
        elif route.raw_body is not None:
            schema = schemas[((route.name, "body"), "validation")]
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": schema},
                    "application/msgpack": {"schema": schema},
                },
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "agentSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Agent-Signature",
                    "description": "hex HMAC-SHA256(agent secret, X-Agent-Timestamp + body), with X-Agent-ID",
                },
            },
        },
    }


def _parameters(
    model: type[BaseModel] | None, where: str, components: dict[str, Any]
) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.get("$defs", {}))
    required = set(schema.get("required", []))
    parameters = []
    for name, field_schema in schema.get("properties", {}).items():
        parameter = {"name": name, "in": where, "required": where == "path" or name in required}
        description = field_schema.pop("description", None)
        if description:
            parameter["description"] = description
        parameter["schema"] = _absent_not_null(field_schema)
        parameters.append(parameter)
    return parameters


def _absent_not_null(schema: dict[str, Any]) -> dict[str, Any]:
    # An optional parameter is left out, never sent as null: describe only its real values.
    options = [option for option in schema.pop("anyOf", []) if option != {"type": "null"}]
    if len(options) == 1:
        schema.update(options[0])
    elif options:
        schema["anyOf"] = options
    if schema.get("default", 0) is None:
        del schema["default"]
    return schema


def _responses(route: Route, schemas: dict[Any, Any]) -> dict[str, Any]:
    problem = {"application/problem+json": {"schema": {"$ref": _REF.format(model="Problem")}}}
    if route.status == 204:
        responses: dict[str, Any] = {"204": {"description": "Done"}}
    else:
        success: dict[str, Any] = {"description": route.summary}
        if route.response is not None:
            success["content"] = {
                "application/json": {"schema": schemas[((route.name, "response"), "serialization")]}
            }
        responses = {str(route.status): success}
        for status, description in route.also.items():
            responses[str(status)] = {**success, "description": description}
    for status, description in _ERRORS.items():
        if status in (401, 403) and route.scope is None:
            continue
        if status in (413, 415) and route.body is None and route.raw_body is None:
            continue
        if status == 409 and route.method == "GET":
            continue
        responses[str(status)] = {"description": description, "content": problem}
    return responses
