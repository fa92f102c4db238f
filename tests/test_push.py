"""Dashboard push: a slow subscriber gets coalesced updates, one far behind gets a snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from hub.config import Settings
from hub.keys import BUS
from tests.conftest import RunningHub, client_ssl, start_hub


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[RunningHub]:
    runner, running = await start_hub(settings.model_copy(update={"push_max_pending": 50}))
    yield running
    await runner.cleanup()


async def _dashboard(hub: RunningHub, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{hub.url}/ws/live?access_token={hub.token()}")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    return ws


async def test_updates_to_one_process_coalesce_to_the_latest(hub: RunningHub) -> None:
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        ws = await _dashboard(hub, session)
        bus = hub.app[BUS]
        # Published faster than any socket drains: only the latest per process may be sent.
        for score in range(1000):
            bus.publish("score", "a:1:0", {"process_key": "a:1:0", "risk_score": score})
        bus.publish("alert", "7", {"id": "7"})
        first = await ws.receive_json(timeout=5)
        second = await ws.receive_json(timeout=5)
        assert first == {"type": "score", "data": {"process_key": "a:1:0", "risk_score": 999}}
        assert second["type"] == "alert"
        await ws.close()
        async with session.get(
            f"{hub.url}/api/v1/stats", headers={"Authorization": f"Bearer {hub.token()}"}
        ) as r:
            stats = await r.json()
        assert stats["push_published"] == 1001
        assert stats["push_coalesced"] == 999


async def test_subscriber_too_far_behind_gets_a_fresh_snapshot(hub: RunningHub) -> None:
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        ws = await _dashboard(hub, session)
        bus = hub.app[BUS]
        for pid in range(200):  # more distinct keys than push_max_pending (50)
            bus.publish("score", f"a:{pid}:0", {"process_key": f"a:{pid}:0", "risk_score": 1.0})
        message = await ws.receive_json(timeout=5)
        assert message["type"] == "snapshot"
        await ws.close()


async def test_dashboard_token_in_query_cookie_or_header(hub: RunningHub) -> None:
    context = client_ssl(hub.certs / "ca.pem")
    token = hub.token()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        for kwargs in (
            {"headers": {"Authorization": f"Bearer {token}"}},
            {"headers": {"Cookie": f"access_token={token}"}},
        ):
            ws = await session.ws_connect(f"{hub.url}/ws/live", **kwargs)
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
            await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{hub.url}/ws/live?access_token=not-a-token")
        assert refused.value.status == 401
