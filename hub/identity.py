"""Who is on the other end of an agent connection: the verified peer certificate."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.certs import CA_CERT, SERVER_CERT, SERVER_KEY, CertificateError, is_valid_agent_id
from hub.store import Store


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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs_dir / CA_CERT))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_cert_chain(certs_dir / SERVER_CERT, certs_dir / SERVER_KEY)
    return context


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """Return the certificate the TLS peer presented and OpenSSL verified, if any."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


async def identify(cert: x509.Certificate | None, store: Store) -> AgentIdentity:
    """Check a verified certificate against the hub's own rules; raise `IdentityError`."""
    if cert is None:
        raise IdentityError("cert_missing", "A client certificate is required to connect as an agent.")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError("cert_expired", "The client certificate is outside its validity period.")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    agent_id = str(names[0].value) if len(names) == 1 else ""
    if not is_valid_agent_id(agent_id):
        raise IdentityError(
            "cn_invalid",
            f"The certificate CN {agent_id!r} is not a valid agent id "
            "(1-64 characters of A-Z a-z 0-9 . _ -, not starting with a dot).",
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise IdentityError(
            "cert_untrusted", "The certificate's extended key usage does not allow clientAuth."
        )
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    if await store.is_revoked(fingerprint):
        raise IdentityError("cert_revoked", f"The certificate of agent {agent_id} has been revoked.")
    return AgentIdentity(agent_id=agent_id, fingerprint=fingerprint, serial=format(cert.serial_number, "x"))
