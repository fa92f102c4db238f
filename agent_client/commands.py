"""The commands a hub may ask this agent to run: an allow-list, and nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

log = logging.getLogger("agent_client.commands")


class CommandHost(Protocol):
    """What command handlers may see of the agent."""

    def status(self) -> dict[str, Any]:
        """Return the agent's state for the `status` command."""
        ...

    def flush(self) -> int:
        """Send spooled events now and return how many are spooled."""
        ...


Handler = Callable[[CommandHost, dict[str, Any]], Awaitable[Any]]


async def _ping(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "ts": time.time()}


async def _status(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    return host.status()


async def _flush_spool(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    return {"spool_depth": host.flush()}


COMMANDS: Final[Mapping[str, Handler]] = {
    "ping": _ping,
    "status": _status,
    "flush_spool": _flush_spool,
}


async def execute(host: CommandHost, command: object) -> dict[str, Any]:
    """Run one hub command if it is on the allow-list and return its ack."""
    if not isinstance(command, dict):
        return _reply(None, error="command must be an object with id, name and args")
    command_id, name, args = command.get("id"), command.get("name"), command.get("args") or {}
    if not isinstance(name, str) or not isinstance(args, dict):
        return _reply(command_id, error="command needs a string 'name' and an object 'args'")
    handler = COMMANDS.get(name)
    if handler is None:
        log.warning("refused command %r (id %s): not on the allow-list", name, command_id)
        return _reply(command_id, error=f"command '{name}' is not on this agent's allow-list")
    try:
        result = await handler(host, args)
    except Exception as exc:
        log.exception("command %r (id %s) failed", name, command_id)
        return _reply(command_id, error=f"{type(exc).__name__}: {exc}")
    log.info("ran command %r (id %s)", name, command_id)
    return _reply(command_id, result=result)


def _reply(command_id: object, *, result: Any = None, error: str | None = None) -> dict[str, Any]:
    return {"id": command_id, "ok": error is None, "result": result, "error": error}
