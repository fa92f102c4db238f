"""The agent's mutual-TLS identity: the client context, and plain words for TLS failures."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from os import PathLike
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from cryptography import x509

PathArg = str | PathLike[str]


# TLS alerts a hub sends about the client certificate, as PROTOCOL.md connect-error codes
_ALERT_CODES: Final = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "cert_expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "cert_revoked",
    "TLSV1_ALERT_UNKNOWN_CA": "cert_untrusted",
    "SSLV3_ALERT_BAD_CERTIFICATE": "cert_untrusted",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "cert_untrusted",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "cert_missing",
}


_CLOSED_AFTER_HANDSHAKE: Final = (
    "the hub closed the connection right after the TLS handshake; it most likely refused "
    "this agent's certificate (issued by a CA it does not trust, expired or revoked)"
)


class CertificateError(ValueError):
    """A certificate, key or CA file that cannot serve as this agent's identity."""


class Diagnosis(NamedTuple):
    """Why TLS with the hub failed: a PROTOCOL.md code when the hub judged our certificate."""

    code: str | None
    message: str


def client_context(cert: PathArg, key: PathArg, ca: PathArg) -> ssl.SSLContext:
    """Build a TLS >= 1.2 client context that trusts `ca` and presents `cert`/`key`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load CA file {ca}: {_reason(exc)}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load certificate {cert} with key {key}: {_reason(exc)}") from None
    return ctx


def check_validity(cert: PathArg, *, now: dt.datetime | None = None) -> None:
    """Raise CertificateError if the certificate file is outside its validity period."""
    try:
        parsed = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read certificate {cert}: {_reason(exc)}") from None
    now = now or dt.datetime.now(dt.UTC)
    if now > parsed.not_valid_after_utc:
        raise CertificateError(
            f"certificate {cert} expired on {parsed.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now < parsed.not_valid_before_utc:
        start = parsed.not_valid_before_utc
        raise CertificateError(f"certificate {cert} is not valid before {start:%Y-%m-%d %H:%M} UTC")


async def diagnose(url: str, ctx: ssl.SSLContext, *, limit_s: float = 5.0) -> Diagnosis | None:
    """Explain why a TLS connection to the hub fails, or return None if TLS itself works."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "wss") or not parts.hostname:
        return None
    host, port = parts.hostname, parts.port or 443
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), limit_s
        )
    except ssl.SSLCertVerificationError as exc:
        return Diagnosis(None, f"the hub's certificate is not trusted: {exc.verify_message}")
    except ssl.SSLError as exc:
        return _alert(exc) or Diagnosis(None, f"TLS with {host}:{port} failed: {_reason(exc)}")
    except (OSError, TimeoutError) as exc:
        return Diagnosis(None, f"cannot reach {host}:{port}: {_reason(exc)}")
    try:
        # with TLS 1.3 the server judges the client certificate after the handshake,
        # so its verdict arrives as an alert on the first read
        writer.write(f"GET /socket.io/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.read(1), limit_s)
    except ssl.SSLError as exc:
        return _alert(exc) or Diagnosis(None, f"TLS with {host}:{port} failed: {_reason(exc)}")
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), limit_s)
    if not first:
        # asyncio servers drop a refused client without sending the TLS alert
        return Diagnosis(None, _CLOSED_AFTER_HANDSHAKE)
    return None


def _alert(exc: ssl.SSLError) -> Diagnosis | None:
    code = _ALERT_CODES.get(str(exc.reason))
    if code is None:
        return None
    return Diagnosis(code, f"the hub refused this agent's certificate in the TLS handshake ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
