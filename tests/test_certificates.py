"""Agent certificates over the real API and real mTLS: upload, sign, list, revoke."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from hub.certs import issue_agent
from hub.config import Settings
from tests.conftest import (
    ConnectAgent,
    RunningHub,
    call,
    client_ssl,
    hub_env,
    open_agent,
    start_hub,
    try_connect,
)
from tests.test_cli import agenthub

Key = ec.EllipticCurvePrivateKey
NOW = dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def self_signed(
    common_name: str,
    *,
    days: int = 30,
    not_before: dt.datetime | None = None,
    usage: x509.ObjectIdentifier | None = None,
    issuer: tuple[x509.Certificate, Key] | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> tuple[x509.Certificate, Key]:
    """A certificate as `openssl req -x509` makes one (CA:TRUE), or one `issuer` signs."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or NOW - dt.timedelta(minutes=1)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (_name(common_name), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def save(folder: Path, agent_id: str, cert: x509.Certificate, key: Key) -> tuple[Path, Path]:
    """Write `<agent_id>.pem` and `.key` where `connect_agent(agent_id, certs=folder)` looks."""
    cert_path, key_path = folder / f"{agent_id}.pem", folder / f"{agent_id}.key"
    cert_path.write_text(pem(cert))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def upload(
    http: aiohttp.ClientSession, hub: RunningHub, agent_id: str, cert: x509.Certificate | str
) -> tuple[int, dict[str, Any]]:
    text = cert if isinstance(cert, str) else pem(cert)
    return await call(http, hub, "POST", "/api/v1/certificates", {"agent_id": agent_id, "certificate": text})


def csr_for(common_name: str, key: Any = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


async def wait_for(check: Callable[[], bool], limit_s: float) -> bool:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# the refusal catalogue ---------------------------------------------------------------------


async def test_a_cn_that_is_not_the_agent_id_is_refused_in_the_words_tooling_expects(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    cert, _ = self_signed("edge-1")
    status, problem = await upload(http, hub, "edge-2", cert)
    assert status == 422
    assert problem["detail"] == "Agent ID mismatch: provided 'edge-2' but certificate CN is 'edge-1'"
    assert problem["errors"] == [{"location": "body.agent_id", "message": problem["detail"]}]


def _garbage() -> str:
    return "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"


def _two() -> str:
    return pem(self_signed("edge-1")[0]) + pem(self_signed("edge-1")[0])


def _expired() -> str:
    return pem(self_signed("edge-1", days=1, not_before=NOW - dt.timedelta(days=10))[0])


def _not_yet_valid() -> str:
    return pem(self_signed("edge-1", not_before=NOW + dt.timedelta(days=1))[0])


def _server_only() -> str:
    return pem(self_signed("edge-1", usage=ExtendedKeyUsageOID.SERVER_AUTH)[0])


def malformed_extension() -> str:
    """A certificate whose extended key usage holds an INTEGER where OIDs belong."""
    usage = x509.UnrecognizedExtension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x30\x03\x02\x01\x01")
    return pem(self_signed("edge-1", extensions=[usage])[0])


def duplicate_extension() -> str:
    """A certificate carrying the extension 1.2.3 twice (no builder makes one: the DER is edited)."""
    first, second = (
        x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), b"\x05\x00") for oid in ("1.2.3", "1.2.4")
    )
    der = self_signed("edge-1", extensions=[first, second])[0].public_bytes(serialization.Encoding.DER)
    oid_1_2_4, oid_1_2_3 = b"\x06\x02\x2a\x04", b"\x06\x02\x2a\x03"
    assert der.count(oid_1_2_4) == 1
    return pem(x509.load_der_x509_certificate(der.replace(oid_1_2_4, oid_1_2_3)))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: "", "not a PEM X.509 certificate"),
        (_garbage, "not a PEM X.509 certificate"),
        (_two, "exactly one PEM certificate, not 2"),
        (_expired, "expired at"),
        (_not_yet_valid, "not valid before"),
        (_server_only, "does not allow clientAuth"),
        (malformed_extension, "extensions cannot be parsed"),
        (duplicate_extension, "carries the extension 1.2.3 more than once"),
    ],
    ids=[
        "empty",
        "garbage",
        "two",
        "expired",
        "not-yet-valid",
        "server-auth-only",
        "malformed-extension",
        "duplicate-extension",
    ],
)
async def test_an_unusable_certificate_is_refused_saying_why(
    hub: RunningHub, http: aiohttp.ClientSession, make: Callable[[], str], words: str
) -> None:
    status, problem = await upload(http, hub, "edge-1", make())
    assert status == 422, problem
    assert words in problem["detail"]
    assert (await call(http, hub, "GET", "/api/v1/certificates"))[1]["data"] == []


@pytest.mark.parametrize(
    "agent_id",
    ["../../etc/x", "a/b", "..", ".hidden", "", "x" * 65, "agent\x00", "agent-1\n", "a\\b", "ca/../x"],
)
async def test_agent_ids_that_are_not_safe_names_are_refused_before_anything_else(
    hub: RunningHub, http: aiohttp.ClientSession, agent_id: str
) -> None:
    files = sorted(hub.certs.iterdir())
    cert, _ = self_signed("edge-1")
    for path, body in (
        ("/api/v1/certificates", {"agent_id": agent_id, "certificate": pem(cert)}),
        ("/api/v1/certificates:sign", {"agent_id": agent_id, "csr": csr_for("edge-1")}),
    ):
        status, problem = await call(http, hub, "POST", path, body)
        assert status == 422, problem
        assert "agent_id" in problem["detail"]
    assert sorted(hub.certs.iterdir()) == files
    assert (await call(http, hub, "GET", "/api/v1/certificates"))[1]["data"] == []


async def test_a_body_over_the_limit_is_refused_with_413(settings: Settings) -> None:
    runner, hub = await start_hub(settings.model_copy(update={"api_max_body_bytes": 4096}))
    connector = aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem"))
    try:
        async with aiohttp.ClientSession(base_url=hub.url, connector=connector) as http:
            status, problem = await upload(http, hub, "edge-1", "A" * 4096)
    finally:
        await runner.cleanup()
    assert status == 413
    assert "the limit is 4096" in problem["detail"]


async def test_changing_certificates_needs_the_admin_scope(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    cert, _ = self_signed("edge-1")
    body = {"agent_id": "edge-1", "certificate": pem(cert)}
    assert (await call(http, hub, "POST", "/api/v1/certificates", body, scope="hub:write"))[0] == 403
    async with http.post("/api/v1/certificates", json=body) as response:
        assert response.status == 401
    revoke = f"/api/v1/certificates/{fingerprint(cert)}:revoke"
    assert (await call(http, hub, "POST", revoke, {"reason": "x"}, scope="hub:write"))[0] == 403
    assert (await call(http, hub, "GET", "/api/v1/certificates", scope="hub:read"))[0] == 200


# trust by fingerprint ------------------------------------------------------------------------


async def test_an_uploaded_self_signed_certificate_lets_its_agent_connect(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent, tmp_path: Path
) -> None:
    cert, key = self_signed("edge-7")
    with pytest.raises(socketio.exceptions.ConnectionError):  # unknown issuer: the handshake fails
        await try_connect(hub, *save(tmp_path, "edge-7", cert, key))

    status, view = await upload(http, hub, "edge-7", cert)
    assert status == 201, view
    assert view["fingerprint"] == fingerprint(cert)
    assert (view["agent_id"], view["source"], view["status"]) == ("edge-7", "uploaded", "valid")
    assert view["revoked_at"] is None

    agent = await connect_agent("edge-7", certs=tmp_path)
    assert (await agent.hello)["agent_id"] == "edge-7"
    assert (await hub.store.get_agent("edge-7"))["cert_fingerprint"] == fingerprint(cert)
    assert (await connect_agent("agent-1")).sio.connected  # the hub CA's certificates still work
    status, again = await upload(http, hub, "edge-7", cert)  # uploading again changes nothing
    assert (status, again["created_at"]) == (201, view["created_at"])


async def test_an_uploaded_certificate_another_ca_issued_connects_without_its_ca(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent, other_ca: Path
) -> None:
    cert = x509.load_pem_x509_certificate((other_ca / "agent-1.pem").read_bytes())
    assert (await upload(http, hub, "agent-1", cert))[0] == 201
    agent = await connect_agent("agent-1", certs=other_ca)
    assert (await hub.store.get_agent("agent-1"))["cert_fingerprint"] == fingerprint(cert)
    assert agent.sio.connected


async def test_a_certificate_signed_by_an_uploaded_one_is_refused(
    hub: RunningHub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    uploaded = self_signed("edge-7")
    assert (await upload(http, hub, "edge-7", uploaded[0]))[0] == 201
    # Whoever holds edge-7's key tries to pass as agent-1. The uploaded certificate is a CA (as
    # `openssl req -x509` makes them), so TLS lets its child through: the hub's own check refuses it.
    child, key = self_signed("agent-1", issuer=uploaded)
    refusal = await try_connect(hub, *save(tmp_path, "agent-1", child, key))
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_untrusted"
    assert await hub.store.get_agent("agent-1") is None


async def test_uploads_are_trusted_again_after_a_restart(settings: Settings, tmp_path: Path) -> None:
    cert, key = self_signed("edge-7")
    save(tmp_path, "edge-7", cert, key)
    runner, first = await start_hub(settings)
    try:
        connector = aiohttp.TCPConnector(ssl=client_ssl(first.certs / "ca.pem"))
        async with aiohttp.ClientSession(base_url=first.url, connector=connector) as http:
            assert (await upload(http, first, "edge-7", cert))[0] == 201
    finally:
        await runner.cleanup()
    runner, second = await start_hub(settings)
    try:
        agent = await open_agent(second, "edge-7", certs=tmp_path)
        await agent.close()
    finally:
        await runner.cleanup()


# CSR signing -----------------------------------------------------------------------------------


async def test_a_signed_csr_gives_a_certificate_the_agent_connects_with(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    status, signed = await call(
        http,
        hub,
        "POST",
        "/api/v1/certificates:sign",
        {"agent_id": "csr-agent", "csr": csr_for("csr-agent", key)},
    )
    assert status == 201, signed
    cert = x509.load_pem_x509_certificate(signed["certificate"].encode())
    assert signed["ca_certificate"] == (hub.certs / "ca.pem").read_text()
    assert signed["fingerprint"] == fingerprint(cert)
    assert signed["serial"] == format(cert.serial_number, "x")
    assert (signed["source"], signed["status"]) == ("issued", "valid")
    assert signed["not_after"] == cert.not_valid_after_utc.timestamp()
    assert round(signed["expires_in_s"] / 86400) == hub.settings.agent_cert_days
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    save(tmp_path, "csr-agent", cert, key)
    agent = await connect_agent("csr-agent", certs=tmp_path)
    assert (await agent.hello)["agent_id"] == "csr-agent"


def _tampered() -> str:
    der = bytearray(
        x509.load_pem_x509_csr(csr_for("csr-agent").encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda: csr_for("someone-else"),
            "Agent ID mismatch: provided 'csr-agent' but certificate CN is 'someone-else'",
        ),
        (lambda: "garbage", "not a PEM certificate signing request"),
        (_tampered, "signature does not verify"),
        (lambda: csr_for("csr-agent", rsa.generate_private_key(65537, 1024)), "1024 bits"),  # noqa: S505 - refused
    ],
    ids=["cn-mismatch", "garbage", "bad-signature", "weak-rsa"],
)
async def test_a_bad_csr_is_refused_saying_why(
    hub: RunningHub, http: aiohttp.ClientSession, make: Callable[[], str], words: str
) -> None:
    status, problem = await call(
        http, hub, "POST", "/api/v1/certificates:sign", {"agent_id": "csr-agent", "csr": make()}
    )
    assert status == 422, problem
    assert words in problem["detail"]


# list and revoke ---------------------------------------------------------------------------------


async def test_the_list_shows_every_known_certificate_with_its_expiry(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    soon, _ = self_signed("edge-1", days=2)
    later, _ = self_signed("edge-2", days=90)
    for agent_id, cert in (("edge-2", later), ("edge-1", soon)):
        assert (await upload(http, hub, agent_id, cert))[0] == 201
    await connect_agent("agent-1")  # a certificate the CLI issued is known once it connected

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit=1&cursor={cursor}" if cursor else "?limit=1"
        status, page = await call(http, hub, "GET", "/api/v1/certificates" + query, scope="hub:read")
        assert status == 200
        seen += page["data"]
        cursor = page["pagination"]["cursor"]
        if cursor is None:
            break
    assert [item["agent_id"] for item in seen] == ["edge-1", "edge-2", "agent-1"]  # soonest to expire first
    assert 1.9 * 86400 < seen[0]["expires_in_s"] < 2 * 86400
    assert seen[2]["source"] == "issued"
    assert all(item["status"] == "valid" for item in seen)

    status, page = await call(http, hub, "GET", "/api/v1/certificates?agent_id=edge-2", scope="hub:read")
    assert [item["fingerprint"] for item in page["data"]] == [fingerprint(later)]
    colons = ":".join(f"{byte:02X}" for byte in bytes.fromhex(fingerprint(soon)))
    status, one = await call(http, hub, "GET", f"/api/v1/certificates/{colons}", scope="hub:read")
    assert (status, one["fingerprint"]) == (200, fingerprint(soon))


async def test_revoking_disconnects_the_agent_at_once_and_refuses_it_after(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-2")
    told: list[Any] = []
    agent.sio.on("revoked", told.append, namespace="/agent")
    other = await connect_agent("agent-3")
    fp = (await hub.store.get_agent("agent-2"))["cert_fingerprint"]

    status, revoked = await call(
        http, hub, "POST", f"/api/v1/certificates/{fp}:revoke", {"reason": "key leaked"}
    )
    assert status == 200, revoked
    assert (revoked["status"], revoked["revocation_reason"], revoked["disconnected"]) == (
        "revoked",
        "key leaked",
        1,
    )
    assert await wait_for(lambda: not agent.sio.connected, 1.0)
    assert told == [{"reason": "key leaked"}]
    assert other.sio.connected
    stored = await hub.store.get_agent("agent-2")
    assert (stored["status"], stored["status_reason"]) == ("offline", "revoked")

    refusal = await try_connect(hub, hub.certs / "agent-2.pem", hub.certs / "agent-2.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"
    status, page = await call(http, hub, "GET", "/api/v1/certificates?status=revoked", scope="hub:read")
    assert [item["fingerprint"] for item in page["data"]] == [fp]
    status, again = await call(http, hub, "POST", f"/api/v1/certificates/{fp}:revoke", {"reason": "twice"})
    assert (status, again["revocation_reason"], again["disconnected"]) == (200, "key leaked", 0)


async def test_a_revoked_upload_is_refused_and_cannot_be_uploaded_again(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent, tmp_path: Path
) -> None:
    cert, key = self_signed("edge-7")
    assert (await upload(http, hub, "edge-7", cert))[0] == 201
    save(tmp_path, "edge-7", cert, key)
    agent = await connect_agent("edge-7", certs=tmp_path)
    status, _ = await call(
        http, hub, "POST", f"/api/v1/certificates/{fingerprint(cert)}:revoke", {"reason": "gone"}
    )
    assert status == 200
    assert await wait_for(lambda: not agent.sio.connected, 1.0)
    refusal = await try_connect(hub, tmp_path / "edge-7.pem", tmp_path / "edge-7.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"
    status, problem = await upload(http, hub, "edge-7", cert)
    assert status == 409
    assert "revoked" in problem["detail"]


async def test_revoking_an_unknown_fingerprint_is_404(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    status, problem = await call(
        http, hub, "POST", f"/api/v1/certificates/{'ab' * 32}:revoke", {"reason": "x"}
    )
    assert status == 404
    assert "ab" * 32 in problem["detail"]
    assert "send the certificate itself" in problem["detail"]
    assert (await call(http, hub, "GET", "/api/v1/certificates/not-hex", scope="hub:read"))[0] == 422


async def test_a_certificate_the_cli_issued_can_be_revoked_before_its_agent_ever_connects(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    env = hub_env(hub.settings)
    result = await asyncio.to_thread(
        agenthub, "certs", "issue", "leaked-1", "--dir", str(hub.certs), cwd=hub.certs, env=env
    )
    assert result.returncode == 0, result.stderr
    fp = fingerprint(x509.load_pem_x509_certificate((hub.certs / "leaked-1.pem").read_bytes()))
    status, known = await call(http, hub, "GET", f"/api/v1/certificates/{fp}", scope="hub:read")
    assert (status, known["agent_id"], known["source"]) == (200, "leaked-1", "issued")

    status, revoked = await call(http, hub, "POST", f"/api/v1/certificates/{fp}:revoke", {"reason": "leaked"})
    assert (status, revoked["status"], revoked["disconnected"]) == (200, "revoked", 0)
    refusal = await try_connect(hub, hub.certs / "leaked-1.pem", hub.certs / "leaked-1.key")
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"


async def test_a_certificate_the_hub_never_saw_is_revoked_by_sending_it(
    hub: RunningHub, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Issued by the hub's CA but never recorded (before the CLI recorded what it issues, or
    # with another data folder), and never used to connect.
    files = issue_agent(hub.certs, "leaked-2", out_dir=tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    path = f"/api/v1/certificates/{fingerprint(cert)}:revoke"
    other, _ = self_signed("leaked-2")
    status, problem = await call(http, hub, "POST", path, {"reason": "leaked", "certificate": pem(other)})
    assert status == 422
    assert f"fingerprint is {fingerprint(other)}, not {fingerprint(cert)}" in problem["detail"]

    status, revoked = await call(http, hub, "POST", path, {"reason": "leaked", "certificate": pem(cert)})
    assert status == 200, revoked
    assert (revoked["agent_id"], revoked["source"], revoked["status"]) == ("leaked-2", "issued", "revoked")
    refusal = await try_connect(hub, files.cert, files.key)
    assert refusal is not None
    assert refusal["data"]["code"] == "cert_revoked"

    # A certificate no agent can connect with (another issuer, never uploaded) is not recorded.
    foreign = pem(other)
    status, problem = await call(
        http,
        hub,
        "POST",
        f"/api/v1/certificates/{fingerprint(other)}:revoke",
        {"reason": "x", "certificate": foreign},
    )
    assert status == 422
    assert "neither issued by a CA this hub trusts nor uploaded" in problem["detail"]
    assert (await call(http, hub, "GET", f"/api/v1/certificates/{fingerprint(other)}", scope="hub:read"))[
        0
    ] == 404


async def test_a_hub_without_a_ca_says_so(settings: Settings, tmp_path: Path) -> None:
    bare = settings.model_copy(update={"dev_insecure": True, "certs_dir": tmp_path / "no-certs"})
    runner, hub = await start_hub(bare)
    try:
        async with aiohttp.ClientSession(base_url=hub.url) as http:
            status, problem = await call(http, hub, "GET", "/api/v1/ca", scope="hub:read")
    finally:
        await runner.cleanup()
    assert status == 404
    assert "this hub has no CA" in problem["detail"]
