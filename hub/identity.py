"""Who is on the other end of an agent connection: the verified peer certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from hub.certs import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    CertificateError,
    begin_ca_rotation,
    ca_bundle,
    common_name,
    complete_ca_retirement,
    fingerprint,
    finish_ca_rotation,
    is_valid_agent_id,
    serial_hex,
    trusted_cas,
)
from hub.config import Settings
from hub.store import Store

log = logging.getLogger(__name__)
CertificateSource = Literal["uploaded", "issued"]


class IdentityError(Exception):
    """A refused agent connection: `code` is the machine code of PROTOCOL.md."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    agent_id: str
    fingerprint: str  # SHA-256 of the DER certificate, hex
    serial: str


def server_ssl_context(certs_dir: Path) -> ssl.SSLContext:
    """Build the listener's context: ask every client for a certificate, verify any given.

    CERT_OPTIONAL lets the API and pages authenticate with tokens on the same port, while
    a presented certificate that does not chain to the CA (or has expired) still fails the
    handshake. The `/agent` namespace refuses connections that presented none.
    """
    missing = [name for name in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (certs_dir / name).is_file()]
    if missing:
        raise CertificateError(
            f"{', '.join(missing)} not found in {certs_dir}: run 'agenthub certs init --dir {certs_dir}' "
            "or point HUB_CERTS_DIR at the folder that holds them"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca_bundle(certs_dir))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    # Uploaded agent certificates become trust anchors of their own (`AgentTrust.trust`); one
    # that is not self-signed can only anchor a chain that OpenSSL may end early.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_cert_chain(certs_dir / SERVER_CERT, certs_dir / SERVER_KEY)
    return context


ProxyAddress = ipaddress.IPv4Network | ipaddress.IPv6Network | Literal["unix"]
CERT_HEADER, VERIFY_HEADER = "X-SSL-Client-Cert", "X-SSL-Client-Verify"
REAL_IP_HEADER = "X-Real-IP"  # the client's address, as a trusted proxy names it


def presented_certificate(
    request: web.Request, trusted_proxies: Sequence[ProxyAddress]
) -> x509.Certificate | None:
    """Return the client certificate of `request`: from a trusted proxy's header, else from TLS.

    A trusted proxy (nginx) verified the certificate and passes it URL-escaped in
    `X-SSL-Client-Cert`; from anyone else that header is ignored, never believed.
    """
    if from_trusted_proxy(request, trusted_proxies):
        return _forwarded_certificate(request.headers)
    return _peer_certificate(request)


def client_address(request: web.Request, trusted_proxies: Sequence[ProxyAddress]) -> str | None:
    """Return the address of whoever made `request`: the TCP peer, or the one a trusted proxy names.

    A trusted proxy (nginx) sets `X-Real-IP` itself, overwriting any a client sent; from
    anyone else the header is the client's word and is ignored.
    """
    if from_trusted_proxy(request, trusted_proxies):
        named = request.headers.get(REAL_IP_HEADER, "")
        try:
            return str(ipaddress.ip_address(named))
        except ValueError:
            pass  # no usable address named: the proxy itself is what is known
    return request.remote


def from_trusted_proxy(request: web.Request, trusted_proxies: Sequence[ProxyAddress]) -> bool:
    """Say whether `request` came from one of `trusted_proxies` (addresses, or "unix" for a unix socket)."""
    if not trusted_proxies or request.transport is None:
        return False
    peer = request.transport.get_extra_info("peername")
    if not isinstance(peer, tuple | list):  # a unix socket names no peer address
        return "unix" in trusted_proxies
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    networks = [proxy for proxy in trusted_proxies if proxy != "unix"]
    return any(address in network for network in networks)


def _forwarded_certificate(headers: Mapping[str, str]) -> x509.Certificate | None:
    # nginx's $ssl_client_verify: SUCCESS, NONE, or FAILED:<reason>.
    verify = headers.get(VERIFY_HEADER, "NONE")
    if verify == "NONE" or not headers.get(CERT_HEADER):
        return None
    if verify != "SUCCESS":
        raise IdentityError("cert_untrusted", f"The proxy could not verify the certificate ({verify}).")
    try:
        return x509.load_pem_x509_certificate(urllib.parse.unquote(headers[CERT_HEADER]).encode())
    except ValueError:
        raise IdentityError(
            "cert_untrusted", f"The proxy's {CERT_HEADER} header is not a URL-escaped PEM certificate."
        ) from None


def _peer_certificate(request: web.Request) -> x509.Certificate | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def check_agent_certificate(cert: x509.Certificate, now: dt.datetime) -> str:
    """Return the agent id `cert` names, or raise `IdentityError` if it cannot identify an agent at `now`."""
    if now < cert.not_valid_before_utc:
        raise IdentityError(
            "cert_expired", f"The certificate is not valid before {cert.not_valid_before_utc.isoformat()}."
        )
    if now > cert.not_valid_after_utc:
        raise IdentityError(
            "cert_expired", f"The certificate expired at {cert.not_valid_after_utc.isoformat()}."
        )
    agent_id = common_name(cert.subject)
    if not is_valid_agent_id(agent_id):
        raise IdentityError(
            "cn_invalid",
            f"The certificate CN {agent_id!r} is not a valid agent id "
            "(1-64 characters of A-Z a-z 0-9 . _ -, not starting with a dot).",
        )
    usages = _extension(cert, x509.ExtendedKeyUsage)
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise IdentityError(
            "cert_untrusted", "The certificate's extended key usage does not allow clientAuth."
        )
    key_usage = _extension(cert, x509.KeyUsage)
    if key_usage is not None and not (key_usage.digital_signature or key_usage.key_agreement):
        raise IdentityError(
            "cert_untrusted",
            "The certificate's key usage allows neither digitalSignature nor keyAgreement, "
            "which a TLS client needs.",
        )
    return agent_id


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    # The extensions are parsed here, on first access: a malformed one is the sender's fault.
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except x509.DuplicateExtension as exc:
        raise IdentityError(
            "cert_untrusted", f"The certificate carries the extension {exc.oid.dotted_string} more than once."
        ) from None
    except ValueError as exc:
        raise IdentityError(
            "cert_untrusted", f"The certificate's extensions cannot be parsed: {exc}."
        ) from None


def certificate_record(cert: x509.Certificate, *, source: CertificateSource, now: float) -> dict[str, Any]:
    """Describe `cert` as the store keeps it."""
    return {
        "fingerprint": fingerprint(cert),
        "agent_id": common_name(cert.subject),
        "serial": serial_hex(cert),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "source": source,
        "created_at": now,
        "pem": cert.public_bytes(Encoding.PEM).decode(),
    }


class AgentTrust:
    """Which client certificates identify agents: issued by the hub CA, or uploaded for that agent.

    Uploaded certificates are trusted by their exact fingerprint only, never as issuers. The
    listener's TLS context (owned here, so an upload counts from the next handshake on) takes
    each as a trust anchor, which lets a certificate it signed through the handshake too; so
    `identify` refuses every certificate the hub CA did not sign itself unless that very
    certificate was uploaded for the agent id it names.
    """

    def __init__(self, store: Store, certs_dir: Path, context: ssl.SSLContext | None) -> None:
        self.context = context
        self._certs_dir = certs_dir
        self._cas = trusted_cas(certs_dir)
        self._store = store

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> AgentTrust:
        """Load the hub CA and build the listener's TLS context (none when the listener is plain HTTP)."""
        complete_ca_retirement(settings.certs_dir)  # one that stopped before deleting the old key
        # Behind a proxy that terminates TLS the listener is plain; identity comes from its header.
        plain = settings.dev_insecure or not settings.listen_tls
        context = None if plain else server_ssl_context(settings.certs_dir)
        return cls(store, settings.certs_dir, context)

    def begin_rotation(self) -> x509.Certificate:
        """Create the next CA and trust it beside the current one from the next handshake on."""
        try:
            next_ca = begin_ca_rotation(self._certs_dir)
        finally:
            self._cas = trusted_cas(self._certs_dir)
        self.trust(next_ca.public_bytes(Encoding.PEM).decode())
        return next_ca

    def finish_rotation(self) -> x509.Certificate:
        """Retire the current CA: its certificates are refused and the server presents the new chain.

        OpenSSL cannot forget a trust anchor, so the retired CA still passes the handshake until
        the hub restarts; `identify` refuses its certificates from now on.
        """
        try:
            return finish_ca_rotation(self._certs_dir)
        finally:
            # Even after a failure: the files are consistent at every step, and trust follows them.
            self._cas = trusted_cas(self._certs_dir)
            if self.context is not None:  # the next handshakes present the server certificate on disk
                self.context.load_cert_chain(self._certs_dir / SERVER_CERT, self._certs_dir / SERVER_KEY)

    def issued_by_retiring_ca(self, cert: x509.Certificate) -> bool:
        """Return True when `cert` comes from a CA a rotation under way will retire."""
        return len(self._cas) > 1 and _issued_by(cert, self._cas[0])

    async def load_uploaded(self) -> None:
        """Trust every certificate operators uploaded (at start)."""
        pems = await self._store.uploaded_certificates(time.time())
        for pem in pems:
            self.trust(pem)
        log.info("trusting %d uploaded agent certificates", len(pems))

    def trust(self, pem: str) -> None:
        """Let the next TLS handshakes accept the certificate `pem` (a second time changes nothing)."""
        if self.context is not None:
            self.context.load_verify_locations(cadata=pem)

    def issued_by_ca(self, cert: x509.Certificate) -> bool:
        """Return True when a CA the hub trusts now signed `cert`."""
        return any(_issued_by(cert, ca) for ca in self._cas)

    async def identify(self, cert: x509.Certificate | None) -> AgentIdentity:
        """Check a certificate TLS verified against the hub's own rules; raise `IdentityError`."""
        if cert is None:
            raise IdentityError("cert_missing", "A client certificate is required to connect as an agent.")
        now = time.time()
        agent_id = check_agent_certificate(cert, dt.datetime.fromtimestamp(now, dt.UTC))
        identity = AgentIdentity(agent_id=agent_id, fingerprint=fingerprint(cert), serial=serial_hex(cert))
        known = await self._store.get_certificate(identity.fingerprint)
        if not self.issued_by_ca(cert) and not (
            known is not None and known["source"] == "uploaded" and known["agent_id"] == agent_id
        ):
            raise IdentityError(
                "cert_untrusted",
                f"The certificate was neither issued by the hub's CA nor uploaded for {agent_id}.",
            )
        if await self._store.is_revoked(identity.fingerprint):
            raise IdentityError("cert_revoked", f"The certificate of agent {agent_id} has been revoked.")
        if known is None:  # first seen: remember it, so operators can list and revoke it
            await self._store.save_certificate(certificate_record(cert, source="issued", now=now))
        return identity


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
