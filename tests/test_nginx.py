"""Agents through a real nginx (nginx/agenthub.conf) with mTLS, and the hub's trusted-proxy header."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.certs import fingerprint
from tests.conftest import HubStarter, RunningHub, client_ssl, free_port, make_events, require_tool

TEMPLATE = Path(__file__).resolve().parent.parent / "nginx" / "agenthub.conf"
LOOPBACK = ipaddress.ip_network("127.0.0.1/32")
ELSEWHERE = ipaddress.ip_network("127.0.0.2/32")  # a proxy address the tests never connect from


def render(values: dict[str, str]) -> str:
    """Fill in the ${HUB_*} placeholders as the README's envsubst line does."""
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    directives = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in directives if "${HUB_" in line]
    return text


@dataclass
class Nginx:
    hub: RunningHub
    agent_url: str
    operator_url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def reload(self) -> None:
        subprocess.run(
            ["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-g",
             f"pid {self.prefix}/nginx.pid;", "-s", "reload"],
            check=True, capture_output=True,
        )  # fmt: skip


def _nginx_conf(prefix: Path, include: Path) -> str:
    # Temp paths inside the prefix: the packaged defaults are root-owned folders.
    temps = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"events {{}}\nhttp {{\n    access_log off;\n{temps}\n    include {include};\n}}\n"


async def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {_read(log)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise AssertionError(f"nginx did not listen on {port}: {_read(log)}")


def _read(path: Path) -> str:
    return path.read_text()


@pytest.fixture
def nginx_binary() -> str:
    return require_tool("nginx")


@pytest.fixture
async def nginx(nginx_binary: str, hub_with: HubStarter, tmp_path: Path) -> AsyncIterator[Nginx]:
    """A plain-HTTP hub trusting 127.0.0.1 as its proxy, and a real nginx in front of it."""
    hub = await hub_with({"listen_tls": False, "trusted_proxies": [LOOPBACK]})
    hub_port = urllib.parse.urlsplit(hub.url).port
    agent_port, operator_port = free_port(), free_port()
    prefix = tmp_path / "nginx"
    process = start_nginx(
        nginx_binary,
        prefix,
        {
            "HUB_AGENT_LISTEN": f"127.0.0.1:{agent_port}",
            "HUB_OPERATOR_LISTEN": f"127.0.0.1:{operator_port}",
            "HUB_CERTS_DIR": str(hub.certs),
            "HUB_NODES": f"server 127.0.0.1:{hub_port};",
        },
    )
    log = prefix / "error.log"
    try:
        await wait_for_port(agent_port, process, log)
        await wait_for_port(operator_port, process, log)
        yield Nginx(
            hub, f"https://127.0.0.1:{agent_port}", f"https://127.0.0.1:{operator_port}", prefix, process
        )
    finally:
        process.terminate()
        process.wait(10)


def start_nginx(binary: str, prefix: Path, values: dict[str, str]) -> subprocess.Popen[bytes]:
    """Run nginx in the foreground under `prefix`, with nginx/agenthub.conf filled in with `values`."""
    prefix.mkdir()
    include = prefix / "agenthub.conf"
    include.write_text(render(values))
    (prefix / "nginx.conf").write_text(_nginx_conf(prefix, include))
    with (prefix / "error.log").open("wb") as errors:
        return subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
             "-g", f"daemon off; pid {prefix}/nginx.pid; error_log stderr;"],
            stdout=errors, stderr=errors,
        )  # fmt: skip


@dataclass
class Attempt:
    hello: dict[str, Any] | None
    refusal: dict[str, Any] | None
    sio: socketio.AsyncClient
    session: aiohttp.ClientSession

    @property
    def agent_id(self) -> str | None:
        """The agent id the hub greeted, None if refused."""
        return None if self.hello is None else self.hello["agent_id"]

    @property
    def code(self) -> str | None:
        """The hub's refusal code; "tls" when TLS or HTTP refused before the hub could answer."""
        if self.refusal is None:
            return None
        return "tls" if "data" not in self.refusal else self.refusal["data"]["code"]

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()
        await self.session.close()


async def connect(
    url: str, certs: Path, agent_id: str | None, *, headers: dict[str, str] | None = None
) -> Attempt:
    """Connect a stock Socket.IO client to `url` as `agent_id`; the caller closes the attempt."""
    cert = certs / f"{agent_id}.pem" if agent_id else None
    key = certs / f"{agent_id}.key" if agent_id else None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(certs / "ca.pem", cert, key))
    )
    sio = socketio.AsyncClient(http_session=session, reconnection=False)
    hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    refusal: dict[str, Any] = {}

    def on_hello(data: dict[str, Any]) -> None:
        if not hello.done():
            hello.set_result(data)

    sio.on("hello", on_hello, namespace="/agent")
    sio.on(
        "connect_error",
        lambda data: refusal.update(data if isinstance(data, dict) else {}),
        namespace="/agent",
    )
    attempt = Attempt(None, None, sio, session)
    try:
        await sio.connect(
            url, namespaces=["/agent"], transports=["websocket"], headers=headers or {}, wait_timeout=5
        )
        attempt.hello = await asyncio.wait_for(hello, 10)
    except socketio.exceptions.ConnectionError:
        attempt.refusal = refusal  # no connect_error: TLS or HTTP refused it
    return attempt


def _escaped_pem(certs: Path, agent_id: str) -> str:
    return urllib.parse.quote((certs / f"{agent_id}.pem").read_text(), safe="")


async def test_agent_streams_events_through_nginx(nginx: Nginx) -> None:
    agent = await connect(nginx.agent_url, nginx.hub.certs, "agent-1")
    try:
        assert agent.agent_id == "agent-1"
        ack = await agent.sio.call("events", {"events": make_events(1, 50)}, namespace="/agent", timeout=30)
        assert ack == {"accepted": 50, "duplicates": 0, "rejected": [], "last_seq": 50}
    finally:
        await agent.close()
    again = await connect(nginx.agent_url, nginx.hub.certs, "agent-1")
    try:
        assert again.hello is not None
        assert again.hello["last_seq"] == 50  # stored by the hub
    finally:
        await again.close()


async def test_no_client_certificate_is_refused_by_nginx(nginx: Nginx) -> None:
    attempt = await connect(nginx.agent_url, nginx.hub.certs, None)
    await attempt.close()
    assert attempt.code == "tls"
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(nginx.hub.certs / "ca.pem")))
    async with http, http.get(nginx.agent_url + "/socket.io/?EIO=4&transport=polling") as response:
        assert response.status == 400  # "No required SSL certificate was sent"


async def test_certificate_of_another_ca_is_refused_by_nginx(nginx: Nginx, other_ca: Path) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            ssl=client_ssl(nginx.hub.certs / "ca.pem", other_ca / "agent-1.pem", other_ca / "agent-1.key")
        )
    )
    async with session, session.get(nginx.agent_url + "/socket.io/?EIO=4&transport=polling") as response:
        assert response.status == 400


async def test_revoked_certificate_is_refused_by_the_hub_then_by_nginx(nginx: Nginx) -> None:
    certs = nginx.hub.certs
    cert = x509.load_pem_x509_certificate((certs / "agent-2.pem").read_bytes())
    headers = {"Authorization": f"Bearer {nginx.hub.token('hub:admin')}"}
    context = client_ssl(certs / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        # Through the operators' block: the API needs no client certificate there.
        revoke = f"{nginx.operator_url}/api/v1/certificates/{fingerprint(cert)}:revoke"
        async with http.post(
            revoke, json={"reason": "compromised", "certificate": cert.public_bytes(Encoding.PEM).decode()},
            headers=headers,
        ) as response:  # fmt: skip
            assert response.status == 200, await response.text()
    crl = x509.load_pem_x509_crl((certs / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    before_reload = await connect(nginx.agent_url, certs, "agent-2")
    await before_reload.close()
    assert before_reload.code == "cert_revoked"  # the hub re-checks revocation itself

    nginx.reload()
    for _ in range(100):  # the old workers finish; new connections meet the new CRL
        after_reload = await connect(nginx.agent_url, certs, "agent-2")
        await after_reload.close()
        assert after_reload.agent_id is None
        if after_reload.code == "tls":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("nginx still lets the revoked certificate through after reload")
    fine = await connect(nginx.agent_url, certs, "agent-1")  # the others still connect
    await fine.close()
    assert fine.agent_id == "agent-1"


async def test_client_sent_certificate_header_is_overwritten_by_nginx(nginx: Nginx) -> None:
    certs = nginx.hub.certs
    forged = {"X-SSL-Client-Cert": _escaped_pem(certs, "agent-2"), "X-SSL-Client-Verify": "SUCCESS"}
    agent = await connect(nginx.agent_url, certs, "agent-1", headers=forged)
    await agent.close()
    assert agent.agent_id == "agent-1"


async def test_operator_block_never_admits_agents(nginx: Nginx) -> None:
    certs = nginx.hub.certs
    forged = {"X-SSL-Client-Cert": _escaped_pem(certs, "agent-1"), "X-SSL-Client-Verify": "SUCCESS"}
    attempt = await connect(nginx.operator_url, certs, None, headers=forged)
    await attempt.close()
    assert attempt.code == "cert_missing"


@pytest.mark.parametrize("listen_tls", [True, False])
async def test_forged_header_straight_to_a_hub_is_ignored(hub_with: HubStarter, listen_tls: bool) -> None:
    hub = await hub_with({"listen_tls": listen_tls, "trusted_proxies": [ELSEWHERE]})
    forged = {"X-SSL-Client-Cert": _escaped_pem(hub.certs, "agent-1"), "X-SSL-Client-Verify": "SUCCESS"}
    attempt = await connect(hub.url, hub.certs, None, headers=forged)
    await attempt.close()
    assert attempt.code == "cert_missing"


@pytest.mark.parametrize(
    ("agent_id", "verify", "code"),
    [
        ("agent-1", "NONE", "cert_missing"),
        ("agent-1", "FAILED:certificate has expired", "cert_untrusted"),
        ("expired-agent", "SUCCESS", "cert_expired"),  # the hub re-checks validity itself
        (None, "SUCCESS", "cert_untrusted"),  # not a PEM certificate
    ],
)
async def test_trusted_proxy_header_counts_only_with_success(
    hub_with: HubStarter, agent_id: str | None, verify: str, code: str
) -> None:
    hub = await hub_with({"listen_tls": False, "trusted_proxies": [LOOPBACK]})
    url = hub.url.replace("https://", "http://")
    pem = _escaped_pem(hub.certs, agent_id) if agent_id else "not%20a%20certificate"
    attempt = await connect(
        url, hub.certs, None, headers={"X-SSL-Client-Cert": pem, "X-SSL-Client-Verify": verify}
    )
    await attempt.close()
    assert attempt.code == code


async def test_trusted_proxy_header_is_rechecked_against_the_hub_ca(
    hub_with: HubStarter, other_ca: Path
) -> None:
    hub = await hub_with({"listen_tls": False, "trusted_proxies": [LOOPBACK]})
    url = hub.url.replace("https://", "http://")
    good = {"X-SSL-Client-Cert": _escaped_pem(hub.certs, "agent-1"), "X-SSL-Client-Verify": "SUCCESS"}
    admitted = await connect(url, hub.certs, None, headers=good)
    await admitted.close()
    assert admitted.agent_id == "agent-1"

    foreign = {"X-SSL-Client-Cert": _escaped_pem(other_ca, "agent-1"), "X-SSL-Client-Verify": "SUCCESS"}
    refused = await connect(url, hub.certs, None, headers=foreign)
    await refused.close()
    assert refused.code == "cert_untrusted"


@pytest.mark.parametrize("trusted", [True, False])
async def test_the_client_address_is_the_one_a_trusted_proxy_names(
    hub_with: HubStarter, trusted: bool
) -> None:
    limits = {"rate_limit_address_burst": 2, "rate_limit_address_per_s": 0.001}
    hub = await hub_with(
        {**limits, "listen_tls": False, "trusted_proxies": [LOOPBACK if trusted else ELSEWHERE]}
    )
    admin = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
    async with aiohttp.ClientSession(base_url=hub.url) as http:

        async def revoke(address: str) -> int:  # any write: it is audited with its client
            headers = {**admin, "X-Real-IP": address}
            path = f"/api/v1/tokens/{uuid.uuid4().hex}:revoke"
            async with http.post(path, json={"reason": "test"}, headers=headers) as response:
                return response.status

        statuses = [await revoke("203.0.113.9") for _ in range(3)] + [await revoke("198.51.100.7")]
        entries = await hub.store.audit_entries(after_id=0, limit=10)
    if trusted:  # one bucket per client nginx names, and the audit log names that client
        assert statuses[2:] == [429, 200]
        assert {entry["client"] for entry in entries} == {"203.0.113.9", "198.51.100.7"}
    else:  # anyone may send the header: it is ignored, and the proxy's own address counts
        assert statuses[2:] == [429, 429]
        assert {entry["client"] for entry in entries} == {"127.0.0.1"}
