"""A node id is held by one live hub: a second is refused, a dead holder replaced."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from hub.app import create_app, serve
from hub.config import Settings
from hub.keys import STORE
from hub.nodes import ClockWatch
from hub.problems import Conflict
from hub.store import Store, create_store
from tests.conftest import HubStarter, client_ssl, open_agent
from tests.test_observability import scrape, value


async def held_by(settings: Settings, **lease: Any) -> None:
    """Leave a lease on `settings.node_id` as a hub that held it would have."""
    store = create_store(settings)
    await store.open()
    try:
        holder = {"node_id": settings.node_id, "instance": "earlier", "renewed_at": time.time(), **lease}
        assert await store.claim_node(holder) is None
    finally:
        await store.close()


def gone_pid() -> int:
    """The pid of a process of this machine that has ended."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(ended.stdout)


async def test_a_second_hub_with_a_live_hubs_node_id_is_refused(hub_with: HubStarter) -> None:
    hub = await hub_with({"node_lease_s": 0.6})
    agent = await open_agent(hub, "agent-1")
    runner = web.AppRunner(create_app(hub.settings))
    with pytest.raises(Conflict, match="HUB_NODE_ID"):  # it watched one lease, and the holder renewed
        await runner.setup()
    await runner.cleanup()
    stored = await hub.store.get_agent("agent-1")
    assert stored["status"] == "online"  # the refused start marked none of the live hub's agents offline
    await agent.close()


async def test_a_stopped_hubs_node_id_is_taken_at_once_and_renewed(settings: Settings) -> None:
    first = web.AppRunner(create_app(settings.model_copy(update={"node_lease_s": 60.0})))
    await first.setup()
    await first.cleanup()  # a clean stop gives the id up
    started = time.monotonic()
    second = web.AppRunner(create_app(settings.model_copy(update={"node_lease_s": 0.6})))
    await second.setup()
    try:
        assert time.monotonic() - started < 0.6
        probe = {"node_id": settings.node_id, "instance": "probe", "host": "h", "pid": 1, "lease_s": 1.0}
        held = await second.app[STORE].claim_node({**probe, "renewed_at": 0.0})
        await asyncio.sleep(0.5)  # past a renewal (every third of the lease)
        renewed = await second.app[STORE].claim_node({**probe, "renewed_at": 0.0})
        assert held is not None
        assert renewed is not None
        assert renewed["renewed_at"] > held["renewed_at"]
    finally:
        await second.cleanup()


async def test_a_holder_whose_process_is_gone_from_this_machine_is_replaced_at_once(
    settings: Settings, hub_with: HubStarter
) -> None:
    await held_by(settings, host=socket.gethostname(), pid=gone_pid(), lease_s=60.0)  # a hub killed with -9
    started = time.monotonic()
    await hub_with({})
    assert time.monotonic() - started < 10


async def test_a_holder_elsewhere_that_stops_renewing_is_replaced_after_its_lease(
    settings: Settings, hub_with: HubStarter
) -> None:
    await held_by(settings, host="another-machine", pid=os.getpid(), lease_s=0.6)
    started = time.monotonic()
    await hub_with({})
    assert time.monotonic() - started >= 0.6


async def test_a_hub_whose_node_id_another_hub_took_stops_and_says_why(settings: Settings) -> None:
    # Another start with this id found the lease unrenewed (this hub was cut off from the store
    # for a whole lease) and took it: two hubs must not serve one id, so this one stops.
    ready = asyncio.Event()
    serving = asyncio.create_task(serve(settings.model_copy(update={"node_lease_s": 0.6}), ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    newcomer = {"node_id": settings.node_id, "instance": "newcomer", "host": "another-machine", "pid": 4242,
                "renewed_at": time.time(), "lease_s": 60.0}  # fmt: skip
    store = create_store(settings)
    await store.open()
    try:
        holder = await store.claim_node(newcomer)
        assert holder is not None
        assert await store.claim_node(newcomer, replacing=holder) is None
        with pytest.raises(Conflict, match=r"taken by a hub on another-machine .*HUB_NODE_ID"):
            await asyncio.wait_for(serving, 30)
        kept = await store.claim_node({**newcomer, "instance": "probe"})
        assert kept is not None
        assert kept["instance"] == "newcomer"  # the stop gave up nothing of the newcomer's
    finally:
        await store.close()


async def test_a_clock_off_the_shared_stores_is_measured_and_said_once_each_way(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    ahead = [10.0]  # this node's clock, seconds ahead of the machine's
    watch = ClockWatch(store, 2.0, clock=lambda: time.time() + ahead[0])
    with caplog.at_level(logging.WARNING, logger="hub.nodes"):
        await watch.check()
        await watch.check()
        if await store.clock() is None:  # SQLite: the store's clock is this machine's
            assert watch.skew_s is None
            assert not caplog.records
            await asyncio.wait_for(watch.watch(3600), 5)  # nothing to watch: it returns at once
            return
        assert watch.skew_s == pytest.approx(10.0, abs=0.5)
        assert [record.levelname for record in caplog.records] == ["ERROR"]  # once, not at every check
        assert "+10." in caplog.records[0].getMessage()
        ahead[0] = 0.0
        await watch.check()
        assert watch.skew_s == pytest.approx(0.0, abs=0.5)
        assert [record.levelname for record in caplog.records] == ["ERROR", "WARNING"]


async def test_a_node_on_postgresql_reports_its_clock_skew(postgres_url: str, hub_with: HubStarter) -> None:
    # postgres_url first: its schema is dropped after the hub has stopped.
    hub = await hub_with({"database_url": SecretStr(postgres_url)})
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
        samples = await scrape(http, hub)
    assert abs(value(samples, "hub_clock_skew_seconds")) < 0.5  # one machine: one clock
