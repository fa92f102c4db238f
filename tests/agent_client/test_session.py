"""The agent session against the real hub over mutual TLS."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent_client.replay import ReplayError, replay
from agent_client.session import AgentSession
from agent_client.spool import Spool
from agent_client.tls import CertificateError
from agent_client.wire import HubRefusalError
from hub.app import NAMESPACE_KEY, create_app, listener_ssl
from hub.config import Settings
from hub.keys import CERTIFICATES, INGESTOR, PRESENCE, STORE
from hub.problems import BatchTooLarge
from tests.agent_client.conftest import QueueSource, StartAgent, generate, until
from tests.conftest import RunningHub


async def _stored_seqs(hub: RunningHub, agent_id: str = "agent-1") -> list[int]:
    rows = await hub.store.replay_events(None, 100_000)
    return [event["seq"] for owner, event in rows if owner == agent_id]


def _sid(hub: RunningHub, agent_id: str = "agent-1") -> str:
    sid = hub.app[PRESENCE].sid_of(agent_id)
    assert sid is not None
    return sid


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_streams_every_event_exactly_once(
    hub: RunningHub, start_agent: StartAgent, encoding: str
) -> None:
    agent = await start_agent(generate(2500), encoding=encoding, inflight=3)
    await agent.drained()
    assert agent.session.last_hello is not None
    assert agent.session.last_hello["agent_id"] == "agent-1"
    assert agent.session.last_hello["last_seq"] == 0
    assert agent.session.acked_seq == 2500
    assert agent.session.spool.depth() == 0
    assert await _stored_seqs(hub) == list(range(1, 2501))


async def test_a_restarted_agent_resumes_after_the_hubs_last_seq(
    hub: RunningHub, start_agent: StartAgent, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool.db")
    first = await start_agent(generate(30), spool=spool)
    await first.drained()
    await first.stop()

    spool.append([{"ts": 1.0, "kind": "custom", "pid": 1}] * 5)  # spooled while offline
    second = await start_agent(generate(10), spool=spool)
    await second.drained()
    assert second.session.last_hello is not None
    assert second.session.last_hello["last_seq"] == 30
    assert await _stored_seqs(hub) == list(range(1, 46))
    await second.stop()
    spool.close()


async def test_a_lost_spool_continues_above_the_hubs_last_seq(
    hub: RunningHub, start_agent: StartAgent, tmp_path: Path
) -> None:
    first = await start_agent(generate(20), spool=tmp_path / "first.db")
    await first.drained()
    await first.stop()

    second = await start_agent(generate(7), spool=tmp_path / "fresh.db")
    await second.drained()
    assert await _stored_seqs(hub) == list(range(1, 28))


async def test_an_overloaded_hub_gets_the_batch_again(
    hub: RunningHub, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ingest = hub.app[INGESTOR].ingest
    answers: list[str] = []

    async def ingest_after_two_refusals(agent_id: str, payload: Any) -> Any:
        if len(answers) < 2:
            answers.append("overloaded")
            return {"error": {"code": "overloaded", "retry_after_ms": 50}}
        answers.append("ok")
        return await real_ingest(agent_id, payload)

    monkeypatch.setattr(hub.app[INGESTOR], "ingest", ingest_after_two_refusals)
    agent = await start_agent(generate(50), inflight=1)
    await agent.drained()
    assert answers[:3] == ["overloaded", "overloaded", "ok"]
    assert await _stored_seqs(hub) == list(range(1, 51))


async def test_internal_errors_are_retried_and_too_large_batches_split(
    hub: RunningHub, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ingest = hub.app[INGESTOR].ingest
    answers: list[str] = []

    async def flaky_then_small(agent_id: str, payload: Any) -> Any:
        if not answers:
            answers.append("internal")
            raise RuntimeError("the hub tripped")  # answered as an 'internal' error ack
        if len(payload["events"]) > 25:
            answers.append("too large")
            raise BatchTooLarge("pretend the limit is 25 events")
        answers.append("ok")
        return await real_ingest(agent_id, payload)

    monkeypatch.setattr(hub.app[INGESTOR], "ingest", flaky_then_small)
    agent = await start_agent(generate(100), inflight=1)
    await agent.drained()
    assert answers[0] == "internal"
    assert "too large" in answers
    assert await _stored_seqs(hub) == list(range(1, 101))


async def test_non_ascii_batches_are_sized_as_they_travel(
    hub: RunningHub, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ingest = hub.app[INGESTOR].ingest
    refusals: list[str] = []

    async def watching(agent_id: str, payload: Any) -> Any:
        try:
            return await real_ingest(agent_id, payload)
        except BatchTooLarge as exc:
            refusals.append(str(exc))
            raise

    async def cyrillic() -> AsyncIterator[dict[str, Any]]:
        for index in range(120):  # ~600 kB as UTF-8 JSON, ~1.8 MB if every letter were escaped
            yield {"ts": 1.0, "kind": "process_start", "pid": 10 + index, "argv": ["й" * 2500]}

    monkeypatch.setattr(hub.app[INGESTOR], "ingest", watching)
    agent = await start_agent(cyrillic())
    await agent.drained()
    assert refusals == []
    assert await _stored_seqs(hub) == list(range(1, 121))


async def test_stop_returns_while_the_source_still_floods(hub: RunningHub, start_agent: StartAgent) -> None:
    async def endless() -> AsyncIterator[dict[str, Any]]:
        index = 0
        while True:
            index += 1
            yield {"ts": 1.0, "kind": "file_open", "pid": 1, "path": f"/f{index}"}

    produced = 0

    async def counted() -> AsyncIterator[dict[str, Any]]:
        nonlocal produced
        async for event in endless():
            produced += 1
            yield event

    agent = await start_agent(counted())
    await asyncio.sleep(1.0)  # long enough for the source buffer to fill
    await asyncio.wait_for(agent.stop(), 15)
    # Nothing the buffer held is lost: it was sent, or it waits in the spool. (The one event
    # the reader was holding while the buffer was full is the source's to replay.)
    spool = Spool(agent.session.spool.path)
    try:
        assert len(await _stored_seqs(hub)) + spool.depth() >= produced - 1
    finally:
        spool.close()


async def test_heartbeats_report_spool_and_host(
    hub: RunningHub, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    presence = hub.app[PRESENCE]
    real_heartbeat = presence.heartbeat
    beats: list[dict[str, Any]] = []

    async def record(agent_id: str, sid: str, beat: Any) -> Any:
        beats.append(dict(beat))
        return await real_heartbeat(agent_id, sid, beat)

    monkeypatch.setattr(presence, "heartbeat", record)
    await start_agent()
    await until(lambda: len(beats) >= 2)
    assert set(beats[0]) == {
        "ts",
        "cpu_percent",
        "mem_percent",
        "disk_percent",
        "spool_depth",
        "dropped",
        "uptime_s",
    }
    assert beats[0]["spool_depth"] == 0
    assert 0 <= beats[0]["mem_percent"] <= 100


async def test_answers_commands_on_its_allow_list_only(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent(generate(3))
    await agent.drained()
    namespace = hub.app[NAMESPACE_KEY]
    sid = _sid(hub)

    async def command(name: str) -> Any:
        return await namespace.call(
            "command", {"id": f"c-{name}", "name": name, "args": {}}, to=sid, timeout=5
        )

    pong = await command("ping")
    assert pong["id"] == "c-ping"
    assert pong["ok"] is True
    assert pong["result"]["pong"] is True
    status = await command("status")
    assert status["result"]["spool_depth"] == 0
    assert status["result"]["version"] == "0.1.0"
    assert (await command("flush_spool"))["result"] == {"spool_depth": 0}
    refused = await command("rm_rf")
    assert refused == {
        "id": "c-rm_rf",
        "ok": False,
        "result": None,
        "error": "command 'rm_rf' is not on this agent's allow-list",
    }


async def test_adopts_a_new_config(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    await hub.app[NAMESPACE_KEY].emit("config", {"heartbeat_interval_s": 7.5, "max_batch": 10}, to=_sid(hub))
    await until(lambda: agent.session.max_batch == 10)
    assert agent.session.heartbeat_interval_s == 7.5


async def test_reconnects_when_the_hub_ends_the_session(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    first_sid = _sid(hub)
    await hub.app[NAMESPACE_KEY].disconnect(first_sid)
    await until(lambda: hub.app[PRESENCE].sid_of("agent-1") not in (None, first_sid))
    await until(lambda: agent.session.connected)
    await agent.stop()
    assert "clean_disconnect" in str(await hub.store.get_agent("agent-1"))


async def test_a_draining_hub_is_rejoined_when_it_says(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    namespace = hub.app[NAMESPACE_KEY]
    sid = _sid(hub)
    # What `drain` does, with a delay of our choosing: the hint, then the transport closes.
    await namespace.emit("reconnect", {"reason": "draining", "after_ms": 2500}, to=sid)
    await namespace.server.eio.drop(namespace.server.manager.eio_sid_from_sid(sid, "/agent"))
    await until(lambda: not agent.session.connected)
    # The library's own reconnection (0.2 s in these tests) would have brought it back by now.
    await asyncio.sleep(1.5)
    assert not agent.session.connected
    await until(lambda: agent.session.connected)
    assert hub.app[PRESENCE].sid_of("agent-1") not in (None, sid)


async def test_a_revocation_stops_the_agent_for_good(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    cert = x509.load_pem_x509_certificate((hub.certs / "agent-1.pem").read_bytes())
    await hub.app[CERTIFICATES].revoke(
        hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(), "key leaked"
    )
    with pytest.raises(HubRefusalError) as refused:  # told `revoked`, then refused at its reconnect
        await asyncio.wait_for(agent.task, 10)
    assert refused.value.code == "cert_revoked"


async def test_a_revoked_message_alone_does_not_silence_the_agent(
    hub: RunningHub, start_agent: StartAgent
) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    await hub.app[NAMESPACE_KEY].emit("revoked", {"reason": "forged"}, to=_sid(hub))
    await asyncio.sleep(0.5)
    assert agent.session.connected
    assert not agent.task.done()


async def test_a_revoked_certificate_is_not_retried(hub: RunningHub, start_agent: StartAgent) -> None:
    cert = x509.load_pem_x509_certificate((hub.certs / "agent-2.pem").read_bytes())
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    await hub.store.revoke(
        fingerprint, serial=format(cert.serial_number, "x"), agent_id="agent-2", reason="test"
    )
    agent = await start_agent(agent_id="agent-2")
    with pytest.raises(HubRefusalError) as refused:
        await asyncio.wait_for(agent.task, 10)
    assert refused.value.code == "cert_revoked"


async def test_a_certificate_from_another_ca_is_explained_and_retried(
    start_agent: StartAgent, other_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await start_agent(certs=other_ca)
    await until(lambda: "most likely refused this agent's certificate" in caplog.text)
    assert not agent.task.done()
    assert not agent.session.connected


def test_an_expired_certificate_fails_before_connecting(hub: RunningHub, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="expired on"):
        AgentSession(
            hub.url,
            hub.certs / "expired-agent.pem",
            hub.certs / "expired-agent.key",
            hub.certs / "ca.pem",
            tmp_path / "spool.db",
        )


async def test_stop_says_goodbye_cleanly(hub: RunningHub, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await until(lambda: agent.session.connected)
    await agent.stop()
    assert agent.task.done()
    assert agent.task.exception() is None
    await until(lambda: hub.app[PRESENCE].sid_of("agent-1") is None)
    stored = await hub.store.get_agent("agent-1")
    assert stored is not None
    assert "clean_disconnect" in str(stored)


async def test_a_failing_source_ends_the_session_with_its_error(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "custom", "pid": 1}\n{oops\n')
    agent = await start_agent(replay(bad))
    with pytest.raises(ReplayError, match=":2:"):
        await asyncio.wait_for(agent.task, 10)


async def _serve_hub(settings: Settings, port: int) -> web.AppRunner:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=listener_ssl(app)).start()
    return runner


async def test_waits_for_a_late_hub_and_survives_its_restart(
    settings: Settings, pki: Path, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = QueueSource()
    session = AgentSession(
        f"https://127.0.0.1:{port}",
        pki / "agent-1.pem",
        pki / "agent-1.key",
        pki / "ca.pem",
        tmp_path / "spool.db",
        reconnection_delay=0.1,
        reconnection_delay_max=0.3,
        randomization_factor=0.05,
    )
    running = asyncio.create_task(session.run(aiter(source)))
    source.feed(200)
    await asyncio.sleep(0.5)  # no hub yet: the first connect keeps retrying
    assert not session.connected
    runner = await _serve_hub(settings, port)
    try:
        await until(lambda: session.acked_seq == 200)
        await runner.cleanup()  # the hub goes away; events keep coming and are spooled
        source.feed(300)
        await until(lambda: session.spool.depth() == 300)
        runner = await _serve_hub(settings, port)
        await until(lambda: session.acked_seq == 500)
        assert session.last_hello is not None
        assert session.last_hello["last_seq"] == 200
        store = runner.app[STORE]
        rows = await store.replay_events(None, 10_000)
        assert [event["seq"] for _, event in rows] == list(range(1, 501))
    finally:
        source.close()
        await session.stop()
        await runner.cleanup()
    assert running.done()
    running.result()


async def test_a_batch_refused_as_overloaded_survives_a_reconnect(
    hub: RunningHub, start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch 1 is refused and waits to retry while batch 2 is stored; the hub's last_seq then
    # covers batch 1 although it was never stored, and the agent must resend it anyway
    real_ingest = hub.app[INGESTOR].ingest
    refused: list[int] = []

    async def refuse_the_first_batch_once(agent_id: str, payload: Any) -> Any:
        if payload["events"][0]["seq"] == 1 and not refused:
            refused.append(1)
            return {"error": {"code": "unavailable", "retry_after_ms": 60_000}}
        return await real_ingest(agent_id, payload)

    monkeypatch.setattr(hub.app[INGESTOR], "ingest", refuse_the_first_batch_once)
    agent = await start_agent(generate(1500), inflight=2)
    for _ in range(500):
        if await hub.store.count_events("agent-1") == 500:
            break
        await asyncio.sleep(0.02)
    assert await _stored_seqs(hub) == list(range(1001, 1501))
    await hub.app[NAMESPACE_KEY].disconnect(_sid(hub))
    await agent.drained()
    assert agent.session.last_hello is not None
    assert agent.session.last_hello["last_seq"] == 1500
    assert await _stored_seqs(hub) == list(range(1, 1501))


async def test_hellos_without_a_resend_between_them_lose_nothing(tmp_path: Path) -> None:
    # Batches 11-20 and 31-40 were answered `overloaded` while the others committed, so the
    # hub's last_seq is 50; then two connections in a row dropped before any resend.
    session = AgentSession("https://127.0.0.1:9", None, None, None, tmp_path / "spool.db")
    await session._resume(0)
    session.spool.append([{"ts": 1.0, "kind": "custom", "pid": 1} for _ in range(50)])
    await session._resume(50)
    await session._resume(50)
    assert [event["seq"] for event in session.spool.pending(0, 100)] == list(range(1, 51))
    assert session.acked_seq == 0
    session.spool.close()
