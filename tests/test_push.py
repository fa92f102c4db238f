"""Dashboard push: a slow subscriber gets coalesced updates, one far behind gets a snapshot."""

from __future__ import annotations

import asyncio
import base64
import os

import aiohttp
import pytest

from hub.config import Settings
from hub.keys import BUS
from hub.tokens import issue_token
from tests.conftest import HubStarter, RunningHub, client_ssl, start_hub


@pytest.fixture
async def hub(hub_with: HubStarter) -> RunningHub:
    # No stats pushes in between: these tests count and order what the bus sends.
    return await hub_with({"push_max_pending": 50, "push_stats_interval_s": 3600})


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


@pytest.fixture
async def strict_hub(hub_with: HubStarter) -> RunningHub:
    limits = {
        "push_max_dashboards_per_principal": 2,
        "token_revocation_cache_s": 0.2,
        "push_stats_interval_s": 3600,
    }
    return await hub_with(limits)


async def test_a_dashboard_closes_when_its_token_is_revoked_or_expires(strict_hub: RunningHub) -> None:
    hub = strict_hub
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        issued = issue_token(hub.settings, scopes=["hub:read"], subject="watcher")
        ws = await session.ws_connect(
            f"{hub.url}/ws/live", headers={"Authorization": f"Bearer {issued.token}"}
        )
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        admin = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
        async with session.post(f"{hub.url}/api/v1/tokens/{issued.jti}:revoke", headers=admin) as response:
            assert response.status == 200
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
        await ws.close()

        short = issue_token(hub.settings, scopes=["hub:read"], subject="watcher", ttl_s=1)
        ws = await session.ws_connect(
            f"{hub.url}/ws/live", headers={"Authorization": f"Bearer {short.token}"}
        )
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        closing = await ws.receive(timeout=5)
        assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
        await ws.close()


async def test_dashboards_are_capped_per_principal_and_other_sites_are_refused(
    strict_hub: RunningHub,
) -> None:
    hub = strict_hub
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        url = f"{hub.url}/ws/live?access_token={hub.token()}"
        open_ones = [await session.ws_connect(url) for _ in range(2)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
        assert refused.value.status == 429
        await open_ones[0].close()
        for _ in range(50):  # the hub notices the close, then has room again
            try:
                open_ones[0] = await session.ws_connect(url)
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("a closed dashboard's place was never freed")
        with pytest.raises(aiohttp.WSServerHandshakeError) as cross_site:
            await session.ws_connect(
                f"{hub.url}/ws/live",
                headers={"Origin": "https://evil.example", "Cookie": f"access_token={hub.token()}"},
            )
        assert cross_site.value.status == 403
        other = issue_token(hub.settings, scopes=["hub:read"], subject="someone-else")
        same_site = await session.ws_connect(
            f"{hub.url}/ws/live",
            headers={"Origin": hub.url, "Authorization": f"Bearer {other.token}"},
        )
        assert (await same_site.receive_json(timeout=5))["type"] == "snapshot"
        for ws in [*open_ones, same_site]:
            await ws.close()


async def test_a_dashboard_that_stops_reading_is_cut_off_and_counted(settings: Settings) -> None:
    runner, hub = await start_hub(settings.model_copy(update={"push_send_timeout_s": 0.5}))
    writer = None
    try:
        port = int(hub.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl(hub.certs / "ca.pem"), server_hostname="127.0.0.1"
        )
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws/live?access_token={hub.token()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # From here on the client reads nothing: its buffers fill, then the hub's.
        bus = hub.app[BUS]
        for index in range(1000):
            bus.publish("score", f"p{index}", {"blob": "x" * 60_000})
            await asyncio.sleep(0)
            if bus.stats.cutoffs:
                break
        for _ in range(200):
            if bus.stats.cutoffs:
                break
            await asyncio.sleep(0.05)
        assert bus.stats.cutoffs == 1
        for _ in range(100):  # the connection's handler unsubscribes once the abort reaches it
            if not bus.subscriber_count:
                break
            await asyncio.sleep(0.02)
        assert bus.subscriber_count == 0
    finally:
        if writer is not None:
            writer.close()
        await runner.cleanup()


async def test_a_stopping_hub_sends_its_dashboards_away_at_once(settings: Settings) -> None:
    runner, hub = await start_hub(settings)
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        ws = await _dashboard(hub, session)
        stopping = asyncio.create_task(runner.cleanup())
        closed = await ws.receive(timeout=3)  # long before the shutdown grace would end it
        assert (closed.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
        await ws.close()
        await stopping


async def test_batch_frames_carry_every_pending_message_as_one_array(hub: RunningHub) -> None:
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        ws = await session.ws_connect(f"{hub.url}/ws/live?batch=1&access_token={hub.token()}")
        [snapshot] = await ws.receive_json(timeout=5)  # every frame is an array, the first one too
        assert snapshot["type"] == "snapshot"
        bus = hub.app[BUS]
        for pid in range(5):  # published at once: pending together, sent together
            bus.publish("score", f"a:{pid}:0", {"process_key": f"a:{pid}:0", "risk_score": 50.0})
        received: list[dict[str, object]] = []
        while len(received) < 5:
            frame = await ws.receive_json(timeout=5)
            assert isinstance(frame, list)
            received += frame
        assert [message["data"]["process_key"] for message in received] == [f"a:{pid}:0" for pid in range(5)]  # type: ignore[index]
        await ws.close()
