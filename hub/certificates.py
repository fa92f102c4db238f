"""Agent certificates operators manage: upload, sign a CSR, list, get, revoke.

The hub knows a certificate when an operator uploaded it (trusted by its exact fingerprint,
PROTOCOL.md's self-signed flow), when it or `agenthub certs issue` signed it, when an agent
first connected with a certificate the CA issued some other way, or when an operator revoked
it by sending the certificate itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from cryptography import x509

from hub.certs import (
    CertificateError,
    RevokedSerial,
    agent_id_mismatch,
    ca_bundle,
    check_agent_id,
    common_name,
    fingerprint,
    serial_hex,
    sign_agent_csr,
    trusted_cas,
    write_crl,
)
from hub.config import Settings
from hub.identity import AgentTrust, IdentityError, certificate_record, check_agent_certificate
from hub.models import Publisher
from hub.notices import revocation_notice
from hub.problems import Conflict, NotFound
from hub.store import Page, Store

log = logging.getLogger(__name__)
# How far back each check looks again: another node's clock may be this much behind.
_CLOCK_SLACK_S = 60.0
CertificateStatus = Literal["valid", "expired", "revoked"]
# Close every live socket using a certificate: (fingerprint, reason) -> how many were closed.
Disconnector = Callable[[str, str], Awaitable[int]]


class RevocationWatch:
    """Close this node's sockets of certificates revoked on any node, as the store records them.

    `check` runs when another node says it revoked something (the message is only a hint:
    whoever can write to Redis cannot revoke by it), and every `interval_s`, so a hint lost
    while Redis was away delays the disconnect by that much at most.
    """

    def __init__(self, store: Store, disconnect_here: Disconnector, *, interval_s: float = 5.0) -> None:
        self._store = store
        self._disconnect_here = disconnect_here
        self._interval_s = interval_s
        self._seen_until = time.time()

    async def check(self) -> None:
        """Apply the revocations recorded since the last check (and a clock slack before it)."""
        for record in await self._store.revocations_since(self._seen_until - _CLOCK_SLACK_S):
            await self._disconnect_here(record["fingerprint"], record["reason"] or "revoked")
            self._seen_until = max(self._seen_until, record["revoked_at"])

    async def run(self) -> None:
        """Check every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception as exc:  # the store failed: the next check looks as far back
                log.warning("checking for revocations made on other nodes failed (%s); will retry", exc)


class CertificateService:
    """Every operator action on agent certificates; HTTP handlers call one method each."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        trust: AgentTrust,
        disconnect: Disconnector,
        publish: Publisher,
    ) -> None:
        self._settings = settings
        self._store = store
        self._trust = trust
        self._disconnect = disconnect
        self._publish = publish

    async def upload(self, agent_id: str, pem: str) -> dict[str, Any]:
        """Trust the PEM certificate `pem` for `agent_id`, by its exact fingerprint, from now on.

        Refused unless its CN is `agent_id`, it is inside its validity period, its usages allow
        a TLS client, and it was never revoked. Uploading a certificate the hub knows as issued
        makes it trusted by fingerprint too (after a CA rotation, say); uploading it again answers
        the record already kept.
        """
        check_agent_id(agent_id)
        cert = _one_certificate(pem)
        found = common_name(cert.subject)
        if found != agent_id:
            raise agent_id_mismatch(agent_id, found)
        now = time.time()
        try:
            check_agent_certificate(cert, dt.datetime.fromtimestamp(now, dt.UTC))
        except IdentityError as refusal:
            raise CertificateError(refusal.message) from None
        record = certificate_record(cert, source="uploaded", now=now)
        if await self._store.is_revoked(record["fingerprint"]):
            raise Conflict(f"certificate {record['fingerprint']} is revoked; it cannot be trusted again")
        stored = await self._store.save_certificate(record)
        self._trust.trust(stored["pem"])
        # Other nodes trust it too once they hear of it (they read it from the store).
        change = {"fingerprint": stored["fingerprint"], "agent_id": agent_id, "status": "uploaded"}
        self._publish("certificate", stored["fingerprint"], change)
        return _view(stored, now)

    async def sign(self, agent_id: str, csr_pem: str) -> dict[str, Any]:
        """Issue a certificate for `agent_id` from its PEM CSR; answer it with the CA certificate."""
        directory = self._settings.certs_dir
        cert = sign_agent_csr(directory, agent_id, csr_pem, days=self._settings.agent_cert_days)
        now = time.time()
        record = await self._store.save_certificate(certificate_record(cert, source="issued", now=now))
        # The bundle of every CA trusted now: during a CA rotation the agent trusts both.
        return {**_view(record, now), "ca_certificate": ca_bundle(directory)}

    async def list(
        self, *, agent_id: str | None, status: CertificateStatus | None, after: list[Any] | None, limit: int
    ) -> Page:
        """Certificates soonest to expire first, filtered."""
        now = time.time()
        page = await self._store.list_certificates(
            agent_id=agent_id, status=status, now=now, after=after, limit=limit
        )
        return Page([_view(record, now) for record in page.items], page.next_key)

    async def get(self, fingerprint: str) -> dict[str, Any]:
        """The certificate with SHA-256 `fingerprint`."""
        return _view(await self._known(fingerprint), time.time())

    async def revoke(self, fingerprint: str, reason: str, *, pem: str | None = None) -> dict[str, Any]:
        """Revoke the certificate `fingerprint`: disconnect the agents using it now, refuse it from now on.

        A certificate the hub does not know (one the CA issued before `agenthub certs issue`
        recorded what it issues, never used yet) is revoked when `pem` is the certificate itself:
        it is recorded first. Without it, an unknown fingerprint is `NotFound`. Revoking again
        keeps the first revocation's time and reason. The agent's HTTP signing secret is withdrawn
        too; issue a new one if it should post over HTTP again. Sockets are closed on every node
        (over Redis for the others); `disconnected` counts this node's.
        """
        known = await self._known(fingerprint) if pem is None else await self._record(fingerprint, pem)
        await self._store.revoke(
            fingerprint,
            serial=known["serial"],
            agent_id=known["agent_id"],
            reason=reason,
            notices=[revocation_notice(known, reason, time.time())],  # queued only by a new revocation
        )
        # A host revoked as compromised must not go on posting signed events either.
        await self._store.set_agent_secret(known["agent_id"], None)
        await self.write_crl()
        disconnected = await self._disconnect(fingerprint, reason)
        return {**_view(await self._known(fingerprint), time.time()), "disconnected": disconnected}

    async def write_crl(self) -> None:
        """Write the CRL a proxy verifying agent certificates loads (`certs_dir/crl.pem`)."""
        revoked: list[RevokedSerial] = []
        after: list[Any] | None = None
        while True:
            page = await self._store.list_certificates(
                agent_id=None, status="revoked", now=time.time(), after=after, limit=500
            )
            revoked += [
                RevokedSerial(
                    issuer=record["issuer"],
                    serial=int(record["serial"], 16),
                    revoked_at=dt.datetime.fromtimestamp(record["revoked_at"], dt.UTC),
                )
                for record in page.items
            ]
            if page.next_key is None:
                break
            after = page.next_key
        try:
            write_crl(self._settings.certs_dir, revoked)
        except OSError as exc:  # a read-only certs folder: the hub itself still refuses revoked ones
            log.warning("cannot write the CRL for a proxy into %s: %s", self._settings.certs_dir, exc)

    def ca_status(self) -> dict[str, Any]:
        """The current CA, the next one while a rotation is under way, and the bundle agents trust."""
        cas = trusted_cas(self._settings.certs_dir)
        if not cas:
            raise NotFound(
                "this hub has no CA (a development hub started without certificates): "
                "create one with 'agenthub certs init' and restart the hub"
            )
        return {
            "current": _ca_view(cas[0]),
            "next": _ca_view(cas[1]) if len(cas) > 1 else None,
            "bundle": ca_bundle(self._settings.certs_dir),
        }

    def begin_rotation(self) -> dict[str, Any]:
        """Create the next CA; trust it beside the current one and issue from it from now on."""
        self._trust.begin_rotation()
        return self.ca_status()

    async def finish_rotation(self, *, force: bool) -> dict[str, Any]:
        """Retire the current CA once no agent still connects with a certificate it issued.

        Agents are judged by the certificate they last connected with; `force` retires the CA
        anyway (those agents are refused at their next connect).
        """
        if not force and (stragglers := await _agents_on_retiring_ca(self._store, self._trust)):
            shown = ", ".join(stragglers[:20]) + (" ..." if len(stragglers) > 20 else "")
            raise Conflict(
                f"{len(stragglers)} agents last connected with a certificate of the CA being retired "
                f"({shown}): re-issue them under the next CA first, or retire with force",
                agents=stragglers,
            )
        self._trust.finish_rotation()
        return self.ca_status()

    async def _known(self, fingerprint: str) -> dict[str, Any]:
        record = await self._store.get_certificate(fingerprint)
        if record is None:
            raise NotFound(
                f"no certificate with fingerprint {fingerprint} is known to this hub; "
                "send the certificate itself (`certificate`, PEM) to revoke one it has never seen"
            )
        return record

    async def _record(self, expected: str, pem: str) -> dict[str, Any]:
        """Return the record of `pem`, made now if it is unknown and a CA the hub trusts issued it."""
        cert = _one_certificate(pem)
        if (found := fingerprint(cert)) != expected:
            raise CertificateError(f"the certificate's fingerprint is {found}, not {expected}")
        known = await self._store.get_certificate(found)
        if known is not None:
            return known
        if not self._trust.issued_by_ca(cert):
            raise CertificateError(
                "the certificate was neither issued by a CA this hub trusts nor uploaded: "
                "no agent can connect with it, so there is nothing to revoke"
            )
        return await self._store.save_certificate(certificate_record(cert, source="issued", now=time.time()))


def _one_certificate(pem: str) -> x509.Certificate:
    try:
        found = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise CertificateError(f"certificate is not a PEM X.509 certificate: {exc}") from None
    if len(found) != 1:
        raise CertificateError(f"certificate must hold exactly one PEM certificate, not {len(found)}")
    return found[0]


def _status(record: dict[str, Any], now: float) -> CertificateStatus:
    if record["revoked_at"] is not None:
        return "revoked"
    return "expired" if record["not_after"] <= now else "valid"


def _view(record: dict[str, Any], now: float) -> dict[str, Any]:
    return {
        "fingerprint": record["fingerprint"],
        "agent_id": record["agent_id"],
        "serial": record["serial"],
        "subject": record["subject"],
        "issuer": record["issuer"],
        "source": record["source"],
        "status": _status(record, now),
        "not_before": record["not_before"],
        "not_after": record["not_after"],
        "expires_in_s": round(record["not_after"] - now, 3),
        "created_at": record["created_at"],
        "revoked_at": record["revoked_at"],
        "revocation_reason": record["revocation_reason"],
        "certificate": record["pem"],
    }


def _ca_view(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "fingerprint": fingerprint(cert),
        "serial": serial_hex(cert),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
    }


async def _agents_on_retiring_ca(store: Store, trust: AgentTrust) -> list[str]:
    stragglers: list[str] = []
    after: list[Any] | None = None
    while True:
        page = await store.list_agents(status=None, after=after, limit=500)
        for agent in page.items:
            record = await store.get_certificate(agent["cert_fingerprint"] or "")
            if record is not None and trust.issued_by_retiring_ca(
                x509.load_pem_x509_certificate(record["pem"].encode())
            ):
                stragglers.append(agent["agent_id"])
        if page.next_key is None:
            return stragglers
        after = page.next_key
