"""The hub's certificate authority: create it, rotate it, issue server and agent certificates.

Rotation keeps agents connected: `begin_ca_rotation` writes a second CA (`ca-next.*`) that
the hub trusts beside the current one and issues every new certificate from; operators
re-issue agents under it (each gets the bundle of both CAs); `finish_ca_rotation` then
re-issues the hub's server certificate under it, makes it current and retires the old CA
(its key is deleted).

Every file is written whole or not at all (a temporary file, fsynced, renamed over the old
one, then the folder fsynced), and the retirement changes one file at a time in an order
that leaves the folder usable after each step, so a failure or crash anywhere is finished
by retrying it or by the next start (`complete_ca_retirement`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.models import AGENT_ID_PATTERN
from hub.problems import HubError

AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)
CA_CERT, CA_KEY = "ca.pem", "ca.key"
NEXT_CA_CERT, NEXT_CA_KEY = "ca-next.pem", "ca-next.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CRL_FILE = "crl.pem"  # for a proxy that verifies agent certificates (nginx `ssl_crl`)
_RESERVED_IDS = frozenset({"ca", "ca-next", "server"})  # agent files share the folder with these
_CA_DAYS = 3650
_SERVER_DAYS = 825
_MIN_RSA_BITS = 2048


class CertificateError(HubError):
    status = 422
    type = "certificate-invalid"
    title = "Certificate problem"


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path


def is_valid_agent_id(agent_id: str) -> bool:
    """Return True when `agent_id` is usable as a CN and as a file name (PROTOCOL.md)."""
    return AGENT_ID_RE.fullmatch(agent_id) is not None


def check_agent_id(agent_id: str) -> None:
    """Raise `CertificateError` unless `agent_id` is a valid agent id."""
    if not is_valid_agent_id(agent_id):
        raise CertificateError(
            f"invalid agent id {agent_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with a dot"
        )


def agent_id_mismatch(agent_id: str, common_name: str) -> CertificateError:
    """The refusal of a certificate or CSR whose CN is not the agent id it was sent for."""
    # Operator tooling matches this sentence: keep its words. Forms show it beside the agent id.
    sentence = f"Agent ID mismatch: provided '{agent_id}' but certificate CN is '{common_name}'"
    return CertificateError(sentence, errors=[{"location": "body.agent_id", "message": sentence}])


def common_name(subject: x509.Name) -> str:
    """Return the subject's CN, or "" unless it has exactly one."""
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else ""


def fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of `cert` (DER), lowercase hex: how the hub names certificates."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    """Return the serial number of `cert` in hex."""
    return format(cert.serial_number, "x")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` beside `path` as `<name>.tmp`, on disk; return where."""
    staged = path.with_name(path.name + ".tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        # Before the first byte: a key must never exist more readable than `mode`, even briefly.
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return staged


def _install(source: Path, path: Path) -> None:
    """Rename `source` over `path` and make the rename itself durable."""
    source.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace `path` with `data` atomically: a reader sees the old file or the new one, whole."""
    _install(_stage(path, data, 0o600 if private else 0o644), path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Agent Hub"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    directory: Path, *, common_name: str = "Agent Hub CA", next_ca: bool = False
) -> x509.Certificate:
    """Write a new CA key pair into `directory`: `ca.pem`/`ca.key`, or `ca-next.*` for a rotation."""
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_name, key_name = (NEXT_CA_CERT, NEXT_CA_KEY) if next_ca else (CA_CERT, CA_KEY)
    _save_pair(directory / cert_name, directory / key_name, cert, key)
    return cert


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA that issues certificates now: the next CA while a rotation is under way."""
    if (directory / NEXT_CA_CERT).is_file():
        cert_path, key_path = directory / NEXT_CA_CERT, directory / NEXT_CA_KEY
    else:
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise CertificateError(f"no CA in {directory}: run 'agenthub certs init --dir {directory}' first")
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    if key.public_key() != cert.public_key():
        # Only between the two last renames of a CA retirement: never sign with the retired key.
        raise CertificateError(
            f"{key_path} is not the key of {cert_path}: a CA retirement stopped before its end; "
            "retry it (POST /api/v1/ca:retire) or restart the hub to finish it"
        )
    return cert, key


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an EC private key")
    return key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    public_key: CertificatePublicKeyTypes,
    *,
    days: int,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName] | None = None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    ca_cert, ca_key = ca
    start = not_before or _now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _save_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    # The key first: a certificate on disk always has its key beside it.
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, _cert_pem(cert))


def _save(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedFiles:
    files = IssuedFiles(directory / f"{stem}.pem", directory / f"{stem}.key")
    _save_pair(files.cert, files.key, cert, key)
    return files


def _server_certificate(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hostnames: list[str],
    public_key: CertificatePublicKeyTypes,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    return _leaf(
        ca,
        hostnames[0],
        public_key,
        days=_SERVER_DAYS,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alt_names=alt_names,
    )


def issue_server(directory: Path, hostnames: list[str]) -> IssuedFiles:
    """Issue the hub's TLS server certificate for `hostnames` (DNS names or IP addresses)."""
    key = _new_key()
    cert = _server_certificate(load_ca(directory), hostnames, key.public_key())
    return _save(directory, "server", cert, key)


def _agent_certificate(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    agent_id: str,
    public_key: CertificatePublicKeyTypes,
    *,
    days: int,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """Build an agent's certificate: CN = `agent_id`, EKU clientAuth; the CLI and the API both use it."""
    if days <= 0:
        raise CertificateError("the validity must be a positive number of days")
    return _leaf(
        ca, agent_id, public_key, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH, not_before=not_before
    )


def new_agent_certificate(
    directory: Path, agent_id: str, *, days: int = 365, not_before: dt.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a client certificate with CN = `agent_id` and EKU clientAuth, and its new key."""
    check_agent_id(agent_id)  # before the id becomes a file name
    if agent_id.lower() in _RESERVED_IDS:
        raise CertificateError(f"{agent_id!r} names the hub's own certificate files; choose another agent id")
    key = _new_key()
    cert = _agent_certificate(
        load_ca(directory), agent_id, key.public_key(), days=days, not_before=not_before
    )
    return cert, key


def save_agent_files(folder: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedFiles:
    """Write `<agent id>.pem` and `<agent id>.key` of a certificate `new_agent_certificate` made."""
    return _save(folder, common_name(cert.subject), cert, key)


def issue_agent(
    directory: Path,
    agent_id: str,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    out_dir: Path | None = None,
) -> IssuedFiles:
    """Issue a client certificate with CN = `agent_id` and EKU clientAuth, with a new key, as files."""
    cert, key = new_agent_certificate(directory, agent_id, days=days, not_before=not_before)
    return save_agent_files(out_dir or directory, cert, key)


def sign_agent_csr(directory: Path, agent_id: str, csr_pem: str, *, days: int) -> x509.Certificate:
    """Sign a PEM certificate signing request of `agent_id` with the CA in `directory`.

    Only the CSR's public key is used: the subject, usages and validity are the hub's, exactly
    as for certificates the CLI issues. The CSR must be signed by its own key (proof that the
    requester holds it) and its CN must be `agent_id`.
    """
    check_agent_id(agent_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"csr is not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify with the public key it carries")
    requested = common_name(csr.subject)
    if requested != agent_id:
        raise agent_id_mismatch(agent_id, requested)
    public_key = csr.public_key()
    _check_key_strength(public_key)
    return _agent_certificate(load_ca(directory), agent_id, public_key, days=days)


def _check_key_strength(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise CertificateError(
                f"the CSR's RSA key has {public_key.key_size} bits; at least {_MIN_RSA_BITS} are needed"
            )
    elif not isinstance(
        public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        raise CertificateError(
            f"the CSR's {type(public_key).__name__} key is not supported: use EC, Ed25519, Ed448 or RSA"
        )


def init_pki(directory: Path, hostnames: list[str]) -> bool:
    """Create the CA and server certificate unless they exist; return True if created."""
    if (directory / CA_CERT).is_file():
        if not (directory / SERVER_CERT).is_file():
            issue_server(directory, hostnames)
            return True
        return False
    create_ca(directory)
    issue_server(directory, hostnames)
    return True


def trusted_cas(directory: Path) -> list[x509.Certificate]:
    """The CAs whose agent certificates the hub accepts: the current one, and the next one if any."""
    paths = [directory / name for name in (CA_CERT, NEXT_CA_CERT)]
    return [_load_cert(path) for path in paths if path.is_file()]


def ca_bundle(directory: Path) -> str:
    """The PEM bundle agents should trust the hub with: every CA it trusts now."""
    return "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in trusted_cas(directory))


@dataclass(frozen=True)
class RevokedSerial:
    issuer: str  # RFC 4514, as the store keeps it
    serial: int
    revoked_at: dt.datetime


def write_crl(directory: Path, revoked: list[RevokedSerial]) -> bool:
    """Write `crl.pem`: a CRL from each CA whose key is here, listing the revoked serials it issued.

    It stays valid as long as its CA: nginx refuses every certificate once a CRL is past its
    next update, and the hub rewrites the file at start and on every revocation anyway. Nothing
    is written (False) when no CA key is here.
    """
    pems: list[bytes] = []
    for cert_name, key_name in ((CA_CERT, CA_KEY), (NEXT_CA_CERT, NEXT_CA_KEY)):
        if not (directory / cert_name).is_file() or not (directory / key_name).is_file():
            continue
        ca, key = _load_cert(directory / cert_name), _load_key(directory / key_name)
        if key.public_key() != ca.public_key():  # mid-retirement: never sign with a retired key
            continue
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(_now() - dt.timedelta(minutes=5))
            .next_update(ca.not_valid_after_utc)
        )
        for entry in revoked:
            if entry.issuer == ca.subject.rfc4514_string():
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(entry.revoked_at)
                    .build()
                )
        pems.append(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    if pems:
        _write(directory / CRL_FILE, b"".join(pems))
    return bool(pems)


def begin_ca_rotation(directory: Path) -> x509.Certificate:
    """Create the next CA beside the current one; new certificates are issued from it from now on."""
    complete_ca_retirement(directory)  # its leftover next key must not be taken for a new one's
    if (directory / NEXT_CA_CERT).is_file():
        raise CertificateRotationError("a CA rotation is already under way: finish it first")
    load_ca(directory)  # there is a current CA to rotate from
    return create_ca(directory, common_name=f"Agent Hub CA {_now():%Y-%m-%d %H%M%S}", next_ca=True)


def finish_ca_rotation(directory: Path) -> x509.Certificate:
    """Re-issue the server certificate under the next CA, make that CA current and retire the old one.

    The retired CA's certificate is kept as `ca-retired-<serial>.pem`, for the record; its key
    is deleted, so it can never sign again. One file changes at a time: a failure before the
    commit (the rename of `ca-next.pem` over `ca.pem`) leaves the rotation under way, one after
    it leaves the old key to delete; retrying finishes either.
    """
    if complete_ca_retirement(directory):
        return _load_cert(directory / CA_CERT)
    if not (directory / NEXT_CA_CERT).is_file():
        raise CertificateRotationError("no CA rotation is under way: begin one first")
    old = _load_cert(directory / CA_CERT)
    next_ca = load_ca(directory)
    # The server keeps its key and only its certificate changes, in one rename: the hub never
    # holds a certificate and a key that do not match. The pair is checked before it is installed.
    server_key = directory / SERVER_KEY
    hostnames = _server_names(_load_cert(directory / SERVER_CERT))
    server = _server_certificate(next_ca, hostnames, _load_key(server_key).public_key())
    staged = _stage(directory / SERVER_CERT, _cert_pem(server), 0o644)
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(staged, server_key)
    # Presented from now on; agents following the rotation trust both CAs already.
    _install(staged, directory / SERVER_CERT)
    _write(directory / f"ca-retired-{serial_hex(old)}.pem", _cert_pem(old))
    _install(directory / NEXT_CA_CERT, directory / CA_CERT)  # the commit: the old CA is no longer trusted
    complete_ca_retirement(directory)
    return next_ca[0]


def complete_ca_retirement(directory: Path) -> bool:
    """Finish a CA retirement that stopped after its commit (delete the old key); return True if it did.

    That state is a next key without a next certificate that belongs to `ca.pem`; a next key
    left by a rotation that stopped while beginning belongs to no certificate and is left alone.
    """
    next_key, current = directory / NEXT_CA_KEY, directory / CA_CERT
    if (directory / NEXT_CA_CERT).exists() or not next_key.is_file() or not current.is_file():
        return False
    if _load_key(next_key).public_key() != _load_cert(current).public_key():
        return False
    _install(next_key, directory / CA_KEY)  # replacing the old key deletes it, last of all
    return True


def _server_names(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names if isinstance(name, x509.DNSName | x509.IPAddress)]


class CertificateRotationError(HubError):
    status = 409
    type = "ca-rotation"
    title = "CA rotation not possible now"
