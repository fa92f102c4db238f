"""Agent commands: send one and wait for its ack, follow its state, list an agent's commands.

The lifecycle, delivery and idempotency rules are `hub.commands`'; this module only
translates HTTP to `CommandService` calls.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.params import AgentPath
from hub.api.spec import ApiRoutes, json_response
from hub.commands import COMMAND_ID_PATTERN, COMMAND_NAME_PATTERN, CommandState, CommandView
from hub.keys import COMMANDS, PRINCIPAL

api = ApiRoutes("commands")


class SendCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str | None = Field(
        None,
        pattern=COMMAND_ID_PATTERN,
        description="your id for the command, so a retry cannot send it twice; a UUID is made when absent",
    )
    name: str = Field(
        pattern=COMMAND_NAME_PATTERN, description="the command; the agent runs only those on its allow-list"
    )
    args: dict[str, Any] = Field(default_factory=dict, description="the command's arguments (bounded size)")
    ttl_s: float | None = Field(
        None, gt=0, description="seconds the command may wait for delivery and its ack before it expires"
    )
    wait_s: float | None = Field(
        None, ge=0, description="seconds this request waits for the ack before answering (0: answer at once)"
    )


class CommandPath(BaseModel):
    command_id: str = Field(pattern=COMMAND_ID_PATTERN, description="the command's id")


class CommandQuery(PageQuery):
    state: CommandState | None = None


@api.post(
    "/api/v1/agents/{agent_id}/commands",
    scope="hub:write",
    path_params=AgentPath,
    body=SendCommand,
    response=CommandView,
    status=201,
    also={200: "The command sent before with this id, in its current state (an idempotent replay)"},
)
async def send_command(request: web.Request, *, path: AgentPath, body: SendCommand) -> web.Response:
    """Send a command to an agent and wait up to `wait_s` for its ack.

    A command for an offline agent is kept and delivered after the agent's next hello, unless
    its TTL passes first. The answer is the command in its state when the wait ended: 201 when
    this request created it, 200 when the id names the same command sent before (nothing is
    sent again). The same id with another agent, name or args is a 409. The agent must have
    connected to this hub at least once (404 otherwise).
    """
    view, created = await request.app[COMMANDS].send(
        path.agent_id,
        body.name,
        body.args,
        created_by=request[PRINCIPAL].subject,
        command_id=body.id,
        ttl_s=body.ttl_s,
        wait_s=body.wait_s,
    )
    location = f"/api/v1/commands/{view['id']}"
    return json_response(view, status=201 if created else 200, headers={"Location": location})


@api.get("/api/v1/commands/{command_id}", scope="hub:read", path_params=CommandPath, response=CommandView)
async def get_command(request: web.Request, *, path: CommandPath) -> dict[str, Any]:
    """Get one command: its state, timestamps, and the agent's result or error."""
    return await request.app[COMMANDS].get(path.command_id)


@api.get(
    "/api/v1/agents/{agent_id}/commands",
    scope="hub:read",
    path_params=AgentPath,
    query=CommandQuery,
    response=PageOf[CommandView],
)
async def list_commands(request: web.Request, *, path: AgentPath, query: CommandQuery) -> dict[str, Any]:
    """List an agent's commands, newest first, optionally in one state."""
    return await paginate(
        request, query, request.app[COMMANDS].list_for_agent, path.agent_id, state=query.state
    )
