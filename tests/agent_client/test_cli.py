"""`agenthub-agent`: help, one-line errors, and real runs against the real hub."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from agent_client.cli import main
from hub.keys import PRESENCE
from tests.agent_client.conftest import until
from tests.conftest import RunningHub


def _identity(hub: RunningHub, agent_id: str = "agent-1") -> list[str]:
    return [
        "--hub",
        hub.url,
        "--cert",
        str(hub.certs / f"{agent_id}.pem"),
        "--key",
        str(hub.certs / f"{agent_id}.key"),
        "--ca",
        str(hub.certs / "ca.pem"),
    ]


async def _agent(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_client.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def test_help_lists_the_run_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "run" in capsys.readouterr().out


def test_run_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--hub",
        "--cert",
        "--key",
        "--ca",
        "--spool",
        "--replay",
        "--encoding",
        "--inflight",
        "--poll-interval",
        "--spool-max",
        "--exit-when-drained",
        "--debug",
    ):
        assert flag in out


async def test_module_help_runs_as_a_program() -> None:
    agent = await _agent("--help")
    out, _ = await agent.communicate()
    assert agent.returncode == 0
    assert b"agenthub-agent" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().err


def test_a_missing_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--hub", "https://hub"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--cert" in err


def test_a_missing_certificate_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "run",
            "--hub",
            "https://hub:8443",
            "--cert",
            str(tmp_path / "none.pem"),
            "--key",
            "k",
            "--ca",
            "c",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("agenthub-agent: error: cannot read certificate")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_a_bad_replay_file_names_the_line(
    hub: RunningHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replay = tmp_path / "bad.jsonl"
    replay.write_text('{"kind": "custom", "pid": 1}\nnot json\n')
    code = main(["run", *_identity(hub), "--spool", str(tmp_path / "s.db"), "--replay", str(replay)])
    assert code == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_exit_when_drained_needs_replay(hub: RunningHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *_identity(hub), "--exit-when-drained"]) == 2
    assert "--exit-when-drained needs --replay" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_replays_a_file_and_exits_when_drained(hub: RunningHub, tmp_path: Path, encoding: str) -> None:
    replay = tmp_path / "events.jsonl"
    lines = [
        {"ts": 1_700_000_000 + i, "kind": "file_open", "pid": 77, "path": f"/etc/f{i}"} for i in range(300)
    ]
    replay.write_text("".join(json.dumps(line) + "\n" for line in lines))
    spool = str(tmp_path / "spool.db")
    options = ["--replay", str(replay), "--exit-when-drained", "--encoding", encoding]
    agent = await _agent("run", *_identity(hub), "--spool", spool, *options)
    _, err = await asyncio.wait_for(agent.communicate(), 60)
    assert agent.returncode == 0, err.decode()
    assert await hub.store.count_events("agent-1") == 300


async def test_sigterm_stops_a_collecting_agent_cleanly(hub: RunningHub, tmp_path: Path) -> None:
    agent = await _agent(
        "run", *_identity(hub), "--spool", str(tmp_path / "spool.db"), "--poll-interval", "0.2"
    )
    try:
        await until(lambda: hub.app[PRESENCE].sid_of("agent-1") is not None, limit_s=30)
        for _ in range(300):  # the first scan reports the running processes
            if await hub.store.count_events("agent-1") > 0:
                break
            await asyncio.sleep(0.05)
        agent.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(agent.communicate(), 30)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
    assert agent.returncode == 0, err.decode()
    assert await hub.store.count_events("agent-1") > 0
    assert "clean_disconnect" in str(await hub.store.get_agent("agent-1"))


async def test_a_frozen_agent_goes_offline_and_flushes_its_spool_after_it_thaws(
    hub: RunningHub, tmp_path: Path
) -> None:
    replay = tmp_path / "events.jsonl"
    lines = [
        {"ts": 1_700_000_000 + i, "kind": "file_open", "pid": 78, "path": f"/srv/f{i}"} for i in range(1500)
    ]
    replay.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = ["--replay", str(replay), "--replay-rate", "500", "--exit-when-drained"]
    agent = await _agent("run", *_identity(hub), "--spool", str(tmp_path / "spool.db"), *options)
    try:
        for _ in range(600):
            if await hub.store.count_events("agent-1") >= 300:
                break
            await asyncio.sleep(0.02)
        agent.send_signal(signal.SIGSTOP)
        frozen_at = asyncio.get_running_loop().time()
        # Offline after 3 missed heartbeat intervals (1.5 s here) and one watcher pass.
        await until(lambda: hub.app[PRESENCE].sid_of("agent-1") is None, limit_s=10)
        assert asyncio.get_running_loop().time() - frozen_at < 4
        for _ in range(250):  # the socket is gone at once; its offline is stored right after
            stored = await hub.store.get_agent("agent-1")
            if stored["status"] == "offline":
                break
            await asyncio.sleep(0.02)
        assert (stored["status"], stored["status_reason"]) == ("offline", "missed_heartbeats")
        frozen_count = await hub.store.count_events("agent-1")
        assert frozen_count < 1500
        agent.send_signal(signal.SIGCONT)
        _, err = await asyncio.wait_for(agent.communicate(), 60)
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGCONT)
            agent.kill()
            await agent.wait()
    assert agent.returncode == 0, err.decode()
    assert await hub.store.count_events("agent-1") == 1500
