"""Schemathesis against the served OpenAPI document: no 5xx, every answer as documented."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.config import Settings
from tests.conftest import RunningHub, open_agent, start_hub
from tests.test_scoring import attack

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


@pytest.fixture
async def seeded_hub(settings: Settings) -> AsyncIterator[RunningHub]:
    """A hub with an agent, its events, scores and alerts, and no rate limit in the way."""
    # No rate limit in the way; commands to an agent that never answers them wait only briefly.
    quick = {"rate_limit_burst": 1_000_000, "command_default_wait_s": 0.2, "command_max_wait_s": 1.0}
    runner, hub = await start_hub(settings.model_copy(update=quick))
    agent = await open_agent(hub, "agent-1")
    await agent.send({"events": attack()})
    await hub.settle()
    yield hub
    await agent.close()
    await runner.cleanup()


@pytest.mark.timeout(600)
async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    seeded_hub: RunningHub, tmp_path: Path
) -> None:
    hub = seeded_hub
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{hub.url}/api/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {hub.token('hub:admin')}",
        "--tls-verify",
        str(hub.certs / "ca.pem"),
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        "--seed",
        "20261124",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    # The hub runs on this event loop: schemathesis must run beside it, not block it.
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
