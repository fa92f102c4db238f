"""Agent certificates: upload (trust by fingerprint), sign a CSR, list, get, revoke."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python 3.11

from hub.api.pagination import PageOf, PageQuery, paginate
from hub.api.spec import ApiRoutes
from hub.certificates import CertificateStatus
from hub.identity import CertificateSource
from hub.keys import CERTIFICATES
from hub.models import AGENT_ID_PATTERN

api = ApiRoutes("certificates")
_MAX_PEM_CHARS = 64 * 1024
AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN, description="the agent id: the certificate's CN")]


def _bare_hex(fingerprint: str) -> str:
    return fingerprint.replace(":", "").lower()


# As the hub shows it (64 hex digits), or as `openssl x509 -fingerprint -sha256` prints it.
Fingerprint = Annotated[
    str,
    Field(
        pattern=r"^(?:[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31})$",
        description="SHA-256 fingerprint of the certificate (DER), hex, with or without colons",
    ),
    AfterValidator(_bare_hex),
]


class CertificateView(TypedDict):
    fingerprint: str
    agent_id: str
    serial: str
    subject: str
    issuer: str
    source: CertificateSource
    status: CertificateStatus
    not_before: float
    not_after: float
    expires_in_s: float
    created_at: float
    revoked_at: float | None
    revocation_reason: str | None
    certificate: str


class SignedCertificate(CertificateView):
    ca_certificate: str


class RevokedCertificate(CertificateView):
    disconnected: int


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    certificate: str = Field(max_length=_MAX_PEM_CHARS, description="one X.509 certificate, PEM")


class SignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    csr: str = Field(max_length=_MAX_PEM_CHARS, description="a PKCS#10 certificate signing request, PEM")


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="why; the agent is told it")
    certificate: str | None = Field(
        None,
        max_length=_MAX_PEM_CHARS,
        description="the certificate itself, PEM: needed only for one the hub has never seen",
    )


class CertificateQuery(PageQuery):
    agent_id: str | None = Field(None, pattern=AGENT_ID_PATTERN)
    status: CertificateStatus | None = None


class CertificatePath(BaseModel):
    fingerprint: Fingerprint


@api.post("/api/v1/certificates", scope="hub:admin", body=UploadBody, response=CertificateView, status=201)
async def upload_certificate(request: web.Request, *, body: UploadBody) -> dict[str, Any]:
    """Upload an agent's certificate: the agent may connect with it from now on.

    The certificate is trusted by its exact fingerprint, never as an issuer. It is refused (422)
    unless its CN is the agent id, it is inside its validity period and, when it carries an
    extended key usage, that allows clientAuth.
    """
    return await request.app[CERTIFICATES].upload(body.agent_id, body.certificate)


@api.post(
    "/api/v1/certificates:sign", scope="hub:admin", body=SignBody, response=SignedCertificate, status=201
)
async def sign_certificate(request: web.Request, *, body: SignBody) -> dict[str, Any]:
    """Sign an agent's CSR with the hub CA.

    The CSR's CN must be the agent id and its signature must verify; only its public key is
    used. The answer carries the certificate and the CA certificate, both PEM.
    """
    return await request.app[CERTIFICATES].sign(body.agent_id, body.csr)


@api.get("/api/v1/certificates", scope="hub:read", query=CertificateQuery, response=PageOf[CertificateView])
async def list_certificates(request: web.Request, *, query: CertificateQuery) -> dict[str, Any]:
    """List the certificates the hub knows, soonest to expire first."""
    return await paginate(
        request, query, request.app[CERTIFICATES].list, agent_id=query.agent_id, status=query.status
    )


@api.get(
    "/api/v1/certificates/{fingerprint}",
    scope="hub:read",
    path_params=CertificatePath,
    response=CertificateView,
)
async def get_certificate(request: web.Request, *, path: CertificatePath) -> dict[str, Any]:
    """Get one certificate by its SHA-256 fingerprint."""
    return await request.app[CERTIFICATES].get(path.fingerprint)


@api.post(
    "/api/v1/certificates/{fingerprint}:revoke",
    scope="hub:admin",
    path_params=CertificatePath,
    body=RevokeBody,
    response=RevokedCertificate,
)
async def revoke_certificate(
    request: web.Request, *, path: CertificatePath, body: RevokeBody
) -> dict[str, Any]:
    """Revoke a certificate: its agents are told why and disconnected at once, and refused from now on.

    Revoking again keeps the first revocation. A certificate the hub has never seen (issued by
    its CA, never used) is revoked when the body carries it (`certificate`, PEM, whose fingerprint
    must be the one in the path); without it, an unknown fingerprint is 404.
    """
    return await request.app[CERTIFICATES].revoke(path.fingerprint, body.reason, pem=body.certificate)


class CaView(TypedDict):
    subject: str
    fingerprint: str
    serial: str
    not_before: float
    not_after: float


class CaStatus(TypedDict):
    current: CaView
    next: CaView | None
    bundle: str


class RetireBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="retire even if some agents still use certificates of the old CA")


@api.get("/api/v1/ca", scope="hub:read", response=CaStatus)
async def get_ca(request: web.Request) -> dict[str, Any]:
    """The hub's CA, the next one during a rotation, and the PEM bundle agents should trust.

    404 when the hub has no CA (a development hub started without certificates).
    """
    return request.app[CERTIFICATES].ca_status()


@api.post("/api/v1/ca:rotate", scope="hub:admin", response=CaStatus, status=201)
async def begin_ca_rotation(request: web.Request) -> dict[str, Any]:
    """Begin a CA rotation: a next CA, trusted beside the current one, issues every new certificate.

    Agents stay connected. Re-issue each agent under the next CA (`certificates:sign`), giving
    it the bundle of both CAs, then retire the old CA with `POST /api/v1/ca:retire`.
    """
    return request.app[CERTIFICATES].begin_rotation()


@api.post("/api/v1/ca:retire", scope="hub:admin", body=RetireBody, response=CaStatus)
async def retire_ca(request: web.Request, *, body: RetireBody) -> dict[str, Any]:
    """Finish a CA rotation: retire the old CA and present a server certificate from the new one.

    Refused (409, naming them) while agents last connected with a certificate of the old CA,
    unless `force`. Connected agents stay connected. One that stops on a file error (500)
    leaves the rotation under way or the old CA retired, as `GET /api/v1/ca` shows; retrying
    finishes it.
    """
    return await request.app[CERTIFICATES].finish_rotation(force=body.force)
