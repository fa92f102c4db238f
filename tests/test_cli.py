"""`agenthub` as a user runs it: real processes, real files, one-line errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.config import Settings
from hub.tokens import TokenVerifier


def assert_user_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    """A user's mistake: exit code 2, a line naming what was wrong, never a traceback."""
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def agenthub(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["certs"],
        ["certs", "init"],
        ["certs", "issue"],
        ["token"],
        ["token", "create"],
        ["recalculate"],
        ["demo"],
    ],
)
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    result = agenthub(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: agenthub" in result.stdout


def test_certs_init_and_issue_write_the_expected_files(tmp_path: Path) -> None:
    result = agenthub("certs", "init", "--dir", "pki", "--hostname", "hub.example.org", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pki = tmp_path / "pki"
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (pki / name).is_file()
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.example.org" in names.get_values_for_type(x509.DNSName)
    assert "already present" in agenthub("certs", "init", "--dir", "pki", cwd=tmp_path).stdout

    result = agenthub("certs", "issue", "web-01", "--dir", "pki", "--days", "30", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((pki / "web-01.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-01"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert stat.S_IMODE((pki / "web-01.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("agent_id", ["../../etc/evil", "has space", ".dot", "x" * 65, "ca", "server"])
def test_certs_issue_refuses_ids_that_are_not_safe_names(tmp_path: Path, agent_id: str) -> None:
    agenthub("certs", "init", "--dir", "pki", cwd=tmp_path)
    result = agenthub("certs", "issue", agent_id, "--dir", "pki", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid agent id" in result.stderr or "the hub's own certificate files" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]


def test_certs_issue_without_a_ca_says_what_to_do(tmp_path: Path) -> None:
    result = agenthub("certs", "issue", "web-01", "--dir", "nowhere", cwd=tmp_path)
    assert_user_error(result, "agenthub certs init")


def test_token_create_signs_with_the_data_dir_secret(tmp_path: Path) -> None:
    result = agenthub(
        "token",
        "create",
        "--scope",
        "hub:read",
        "--scope",
        "hub:write",
        "--ttl",
        "120",
        "--subject",
        "alice",
        "--data-dir",
        "state",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    secret = tmp_path / "state" / "jwt.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    principal = TokenVerifier(Settings(data_dir=tmp_path / "state")).verify(result.stdout.strip())
    assert principal.subject == "alice"
    assert principal.scopes == {"hub:read", "hub:write"}
    # The environment variable names the same folder.
    again = agenthub("token", "create", "--scope", "hub:admin", cwd=tmp_path, env={"HUB_DATA_DIR": "state"})
    assert (
        TokenVerifier(Settings(data_dir=tmp_path / "state")).verify(again.stdout.strip()).subject
        == "operator"
    )


def test_token_create_refuses_an_unknown_scope(tmp_path: Path) -> None:
    result = agenthub("token", "create", "--scope", "hub:everything", cwd=tmp_path)
    assert_user_error(result, "unknown scope 'hub:everything'")


def test_serve_without_certificates_explains(tmp_path: Path) -> None:
    result = agenthub("serve", "--port", "0", "--certs-dir", "missing", cwd=tmp_path)
    assert_user_error(result, "agenthub certs init")


def test_bad_rule_file_stops_start_up_naming_rule_and_field(tmp_path: Path) -> None:
    agenthub("certs", "init", "--dir", "certs", cwd=tmp_path)
    rules = tmp_path / "bad.toml"
    rules.write_text(
        '[[rule]]\nid = "broken-rule"\nname = "x"\nseverity = "HIGH"\nweight = 5\n'
        '[rule.when]\nkind = "process_start"\nargv_regex = "(unclosed"\n'
    )
    result = agenthub("serve", "--port", "0", cwd=tmp_path, env={"HUB_RULE_FILES": f'["{rules}"]'})
    assert_user_error(result, "broken-rule")
    assert "argv_regex" in result.stderr


def test_bad_setting_is_named(tmp_path: Path) -> None:
    result = agenthub("serve", cwd=tmp_path, env={"HUB_PORT": "eighty"})
    assert_user_error(result, "HUB_PORT")
