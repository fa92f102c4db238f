"""CA rotation: a second CA beside the first, agents re-issued, the old one retired; nobody drops."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hub.certs import ca_bundle, load_ca
from hub.config import Settings
from hub.identity import server_ssl_context
from tests.conftest import RunningHub, client_ssl, make_events, open_agent, start_hub, try_connect
from tests.test_certificates import csr_for, save


async def call(hub: RunningHub, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    # A fresh connection each time: the server certificate changes during the test.
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"), force_close=True)
    async with (
        aiohttp.ClientSession(base_url=hub.url, connector=connector) as http,
        http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {hub.token('hub:admin')}"}
        ) as r,
    ):
        return r.status, await r.json()


async def reissue(hub: RunningHub, agent_id: str, folder: Path) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    status, signed = await call(
        hub, "POST", "/api/v1/certificates:sign", {"agent_id": agent_id, "csr": csr_for(agent_id, key)}
    )
    assert status == 201, signed
    assert signed["ca_certificate"].count("BEGIN CERTIFICATE") == 2  # the agent trusts both CAs now
    cert = x509.load_pem_x509_certificate(signed["certificate"].encode())
    save(folder, agent_id, cert, key)
    return cert


async def test_rotating_the_ca_keeps_every_agent_connected(hub: RunningHub, tmp_path: Path) -> None:
    reissued = tmp_path / "reissued"
    reissued.mkdir()
    old_ca = x509.load_pem_x509_certificate((hub.certs / "ca.pem").read_bytes())

    early = await open_agent(hub, "agent-1")  # connected with a certificate of the old CA
    status, rotation = await call(hub, "POST", "/api/v1/ca:rotate")
    assert status == 201, rotation
    assert rotation["next"]["subject"] != rotation["current"]["subject"]
    assert (await call(hub, "POST", "/api/v1/ca:rotate"))[0] == 409  # one rotation at a time

    # Agents re-issued under the next CA connect; old-CA certificates still work meanwhile.
    new_cert = await reissue(hub, "agent-1", reissued)
    assert new_cert.issuer.rfc4514_string() == rotation["next"]["subject"]
    moved = await open_agent(hub, "agent-1", certs=reissued)  # supersedes `early`, on the new CA
    still_old = await open_agent(hub, "agent-3")
    await still_old.close()

    status, refusal = await call(hub, "POST", "/api/v1/ca:retire", {})
    assert status == 409
    assert refusal["agents"] == ["agent-3"]

    status, retired = await call(hub, "POST", "/api/v1/ca:retire", {"force": True})
    assert status == 200, retired
    assert retired["current"] == rotation["next"]
    assert retired["next"] is None
    assert (hub.certs / f"ca-retired-{format(old_ca.serial_number, 'x')}.pem").is_file()
    assert not (hub.certs / "ca-next.key").exists()

    # The socket made before the retirement is still up and acked.
    assert moved.sio.connected
    assert (await moved.send({"events": make_events(1, 3)}))["accepted"] == 3
    # New handshakes see the server certificate of the new CA, and old-CA agents are refused.
    again = await open_agent(hub, "agent-1", certs=reissued)
    assert (await again.hello)["agent_id"] == "agent-1"
    refusal_data = await try_connect(hub, hub.certs / "agent-3.pem", hub.certs / "agent-3.key")
    assert refusal_data is not None
    assert refusal_data["data"]["code"] == "cert_untrusted"
    for conn in (early, moved, again):
        await conn.close()
    assert (await call(hub, "POST", "/api/v1/ca:retire", {}))[0] == 409  # nothing to retire


async def test_uploading_a_certificate_known_as_issued_trusts_it_after_the_retirement(
    hub: RunningHub,
) -> None:
    agent = await open_agent(hub, "agent-3")  # the hub knows its certificate now, as issued
    await agent.close()
    assert (await call(hub, "POST", "/api/v1/ca:rotate"))[0] == 201
    assert (await call(hub, "POST", "/api/v1/ca:retire", {"force": True}))[0] == 200
    cert, key = hub.certs / "agent-3.pem", hub.certs / "agent-3.key"
    refusal = await try_connect(hub, cert, key)
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_untrusted"

    body = {"agent_id": "agent-3", "certificate": cert.read_text()}
    status, view = await call(hub, "POST", "/api/v1/certificates", body)
    assert (status, view["source"]) == (201, "uploaded")
    assert await try_connect(hub, cert, key) is None


# a retirement that fails midway ------------------------------------------------------------


def trusting_both(hub: RunningHub, folder: Path) -> RunningHub:
    """The hub as clients that trust both CAs of a rotation (as agents do) reach it."""
    folder.mkdir(exist_ok=True)
    if not (folder / "ca.pem").exists():
        (folder / "ca.pem").write_text(ca_bundle(hub.certs))
    return dataclasses.replace(hub, certs=folder)


async def retire_failing_on(hub: RunningHub, target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retire the CA while renaming a file over `target` fails as on a full disk."""
    rename = os.replace

    def failing(source: Any, destination: Any) -> None:
        if Path(destination) == target:
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        rename(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing)
        status, problem = await call(hub, "POST", "/api/v1/ca:retire", {"force": True})
    assert (status, problem["title"]) == (500, "Internal error")


async def old_ca_certificate_accepted(hub: RunningHub, certs: Path) -> bool:
    """Whether agent-3, with its certificate of the old CA, may connect now."""
    try:
        refusal = await try_connect(hub, certs / "agent-3.pem", certs / "agent-3.key")
    except socketio.exceptions.ConnectionError:
        return False  # in the handshake: a hub started after the retirement no longer anchors the old CA
    assert refusal is None or refusal["data"]["code"] == "cert_untrusted", refusal
    return refusal is None


async def rotation_under_way(hub: RunningHub, certs: Path) -> bool:
    """What `GET /api/v1/ca` says, after checking that the hub trusts the old CA exactly then."""
    status, ca = await call(hub, "GET", "/api/v1/ca")
    assert status == 200, ca
    under_way = ca["next"] is not None
    assert await old_ca_certificate_accepted(hub, certs) == under_way
    server_ssl_context(certs)  # the files make a hub that starts: a CA, and a server certificate with its key
    return under_way


def assert_retired(certs: Path, old_ca: x509.Certificate) -> None:
    """Only the new CA is left: no next files, the old certificate kept for the record, its key gone."""
    assert not (certs / "ca-next.pem").exists()
    assert not (certs / "ca-next.key").exists()
    assert not list(certs.glob("*.tmp"))
    kept = (certs / f"ca-retired-{format(old_ca.serial_number, 'x')}.pem").read_bytes()
    assert kept == old_ca.public_bytes(serialization.Encoding.PEM)
    load_ca(certs)  # ca.key is the key of ca.pem
    for path in certs.glob("*.key"):
        assert serialization.load_pem_private_key(path.read_bytes(), None).public_key() != old_ca.public_key()


@pytest.mark.parametrize(
    ("failing", "under_way"),
    [("server.pem", True), ("ca.pem", True), ("ca.key", False)],
    ids=["before-the-server-certificate", "at-the-commit", "before-deleting-the-old-key"],
)
async def test_a_retirement_that_fails_midway_leaves_consistent_files_and_a_retry_finishes_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, under_way: bool
) -> None:
    certs = settings.certs_dir
    old_ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    runner, hub = await start_hub(settings)
    try:
        assert (await call(hub, "POST", "/api/v1/ca:rotate"))[0] == 201
        client = trusting_both(hub, tmp_path / "both")
        await retire_failing_on(client, certs / failing, monkeypatch)
        assert await rotation_under_way(client, certs) == under_way

        status, retired = await call(client, "POST", "/api/v1/ca:retire", {"force": True})
        assert (status, retired["next"]) == (200, None)
        assert not await rotation_under_way(client, certs)
        assert_retired(certs, old_ca)
    finally:
        await runner.cleanup()
    runner, hub = await start_hub(settings)
    try:
        assert not await rotation_under_way(trusting_both(hub, tmp_path / "both"), certs)
    finally:
        await runner.cleanup()


async def test_a_restart_finishes_a_retirement_that_stopped_before_deleting_the_old_key(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = settings.certs_dir
    old_ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    runner, hub = await start_hub(settings)
    try:
        assert (await call(hub, "POST", "/api/v1/ca:rotate"))[0] == 201
        await retire_failing_on(trusting_both(hub, tmp_path / "both"), certs / "ca.key", monkeypatch)
    finally:
        await runner.cleanup()
    runner, hub = await start_hub(settings)
    try:
        assert_retired(certs, old_ca)
        client = trusting_both(hub, tmp_path / "both")
        assert not await rotation_under_way(client, certs)
        assert (await call(client, "POST", "/api/v1/ca:retire", {"force": True}))[0] == 409  # nothing left
    finally:
        await runner.cleanup()
