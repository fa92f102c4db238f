"""Who may connect as an agent: refusals in the TLS handshake or with a PROTOCOL.md code."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
import socketio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.certs import load_ca
from hub.identity import IdentityError, check_agent_certificate
from tests.conftest import ConnectAgent, RunningHub, try_connect
from tests.test_certificates import duplicate_extension, malformed_extension


def _cert_with_cn(
    ca_dir: Path, out: Path, common_name: str, usage: x509.ObjectIdentifier
) -> tuple[Path, Path]:
    """Sign a certificate our own `certs issue` would refuse to make (bad CN, wrong EKU)."""
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "odd.pem", out / "odd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_no_certificate_is_refused_with_cert_missing(hub: RunningHub) -> None:
    refusal = await try_connect(hub, None, None)
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_missing"
    assert "certificate is required" in refusal["message"]


async def test_certificate_from_another_ca_fails_the_handshake(hub: RunningHub, other_ca: Path) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        await try_connect(hub, other_ca / "agent-1.pem", other_ca / "agent-1.key")
    assert await hub.store.count_events() == 0


async def test_expired_certificate_fails_the_handshake(hub: RunningHub) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        await try_connect(hub, hub.certs / "expired-agent.pem", hub.certs / "expired-agent.key")


@pytest.mark.parametrize("common_name", ["bad agent!", ".hidden", "../../etc/passwd", "agent\u00e9"])
async def test_cn_outside_the_charset_is_refused(hub: RunningHub, tmp_path: Path, common_name: str) -> None:
    cert, key = _cert_with_cn(hub.certs, tmp_path, common_name, ExtendedKeyUsageOID.CLIENT_AUTH)
    refusal = await try_connect(hub, cert, key)
    assert refusal is not None
    assert refusal["data"]["code"] == "cn_invalid"
    assert await hub.store.count_events() == 0


async def test_certificate_without_client_auth_usage_is_refused(hub: RunningHub, tmp_path: Path) -> None:
    cert, key = _cert_with_cn(hub.certs, tmp_path, "server-ish", ExtendedKeyUsageOID.SERVER_AUTH)
    # OpenSSL itself refuses a serverAuth-only certificate for a client, or the hub does.
    try:
        refusal = await try_connect(hub, cert, key)
    except socketio.exceptions.ConnectionError:
        return
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_untrusted"


@pytest.mark.parametrize(
    ("make", "words"),
    [(malformed_extension, "cannot be parsed"), (duplicate_extension, "1.2.3 more than once")],
    ids=["malformed-extension", "duplicate-extension"],
)
def test_a_certificate_whose_extensions_cannot_be_read_is_untrusted(
    make: Callable[[], str], words: str
) -> None:
    # OpenSSL will not use these in a handshake; the hub's own check (uploads pass it too) must
    # refuse them as well, not crash.
    cert = x509.load_pem_x509_certificate(make().encode())
    with pytest.raises(IdentityError) as refusal:
        check_agent_certificate(cert, dt.datetime.now(dt.UTC))
    assert refusal.value.code == "cert_untrusted"
    assert words in refusal.value.message


async def test_revoked_certificate_is_refused(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    agent = await connect_agent("agent-2")
    await agent.close()
    stored = await hub.store.get_agent("agent-2")
    await hub.store.revoke(stored["cert_fingerprint"], serial="", agent_id="agent-2", reason="test")
    refusal = await try_connect(hub, hub.certs / "agent-2.pem", hub.certs / "agent-2.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"


async def test_a_second_connection_supersedes_the_first(hub: RunningHub, connect_agent: ConnectAgent) -> None:
    first = await connect_agent("agent-1")
    second = await connect_agent("agent-1")
    for _ in range(100):
        if not first.sio.connected:
            break
        await asyncio.sleep(0.02)
    assert not first.sio.connected
    assert second.sio.connected
    assert (await hub.store.get_agent("agent-1"))["status"] == "online"
