"""The agent's TLS identity files."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest

from agent_client.tls import CertificateError, check_validity, client_context


def test_builds_a_mutual_tls_client_context(pki: Path) -> None:
    ctx = client_context(pki / "agent-1.pem", pki / "agent-1.key", pki / "ca.pem")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_missing_ca_is_a_clear_error(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot load CA file"):
        client_context(pki / "agent-1.pem", pki / "agent-1.key", tmp_path / "none.pem")


def test_a_key_that_does_not_match_is_a_clear_error(pki: Path) -> None:
    with pytest.raises(CertificateError, match="cannot load certificate"):
        client_context(pki / "agent-1.pem", pki / "agent-2.key", pki / "ca.pem")


def test_validity_is_checked_against_the_clock(pki: Path) -> None:
    check_validity(pki / "agent-1.pem")
    with pytest.raises(CertificateError, match="expired on"):
        check_validity(pki / "expired-agent.pem")
    with pytest.raises(CertificateError, match="not valid before"):
        check_validity(pki / "agent-1.pem", now=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
