"""CA rotation: a second CA beside the first, agents re-issued, the old one retired; nobody drops."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hub.config import Settings
from tests.conftest import RunningHub, client_ssl, make_events, open_agent, start_hub, try_connect
from tests.test_certificates import csr_for, save


@pytest.fixture
async def own_pki_hub(settings: Settings) -> AsyncIterator[RunningHub]:
    runner, hub = await start_hub(settings)
    yield hub
    await runner.cleanup()


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


async def test_rotating_the_ca_keeps_every_agent_connected(own_pki_hub: RunningHub, tmp_path: Path) -> None:
    hub = own_pki_hub
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
