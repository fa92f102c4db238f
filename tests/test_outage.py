"""The store away while agents stream: the fast variant of bench/reliability/outage.py (`make soak`)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from bench.reliability.outage import Config, Relay, Store, StoreUnreachableError, outage
from tests.conftest import POSTGRES_URL, free_port, require_service


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_store_outage_answers_unavailable_and_loses_nothing(tmp_path: Path, store: Store) -> None:
    """3 s without the store: agents told `unavailable`, no false ack, the backlog drains, all stored."""
    config = Config(
        store=store, agents=4, warmup_s=2.0, outage_s=3.0, tail_s=1.0, drain_limit_s=30.0,
        postgres_url=POSTGRES_URL, workdir=tmp_path,
        # a lock is waited for this long before `unavailable`: several times within the outage
        hub_settings=(("SQLITE_BUSY_TIMEOUT_S", "0.5"),),
    )  # fmt: skip
    try:
        report = await outage(config, out=lambda _line: None)
    except StoreUnreachableError as exc:
        require_service("PostgreSQL", exc)
    assert report.passed, "\n".join([report.summary(), *report.problems, f"files: {tmp_path}"])
    assert report.agents_told == config.agents
    assert report.stored == report.produced > 0


async def test_relay_plays_a_stopped_server() -> None:
    """Stopped, the relay resets open connections and refuses new ones, as a stopped server does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionResetError):  # the relay resets its side when stopped
            while data := await reader.read(1024):
                writer.write(data)
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    relay = Relay(free_port(), ("127.0.0.1", upstream.sockets[0].getsockname()[1]))
    await relay.listen()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"

        assert await relay.stop() == 1
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", relay.port)

        await relay.listen()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"back")
        assert await reader.readexactly(4) == b"back"
        writer.close()
    finally:
        await relay.close()
        upstream.close()
        await upstream.wait_closed()
