"""The audit log: the hash chain, `agenthub audit verify` against a tampered file, API writes recorded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hub.audit import GENESIS, Action, AuditLog, cli_action, entry_hash
from hub.config import Settings
from hub.store import Store, create_store
from hub.store.sqlite import SqliteStore
from hub.tokens import issue_token
from tests.conftest import RunningHub, hub_env
from tests.test_cli import agenthub


def _action(n: int, *, actor: str = "alice") -> Action:
    return Action(
        actor=actor,
        token_id=f"jti-{actor}",
        action="acknowledge_alert",
        method="POST",
        path="/api/v1/alerts/{alert_id}:acknowledge",
        target={"alert_id": str(n)},
        status=200,
        correlation_id=f"corr-{n}",
        client="127.0.0.1",
    )


async def _chain(data_dir: Path, count: int) -> None:
    """Write `count` entries into the hub database under `data_dir`, then close it."""
    store = SqliteStore(data_dir / "hub.db")
    await store.open()
    try:
        for n in range(1, count + 1):
            await AuditLog(store).append(_action(n))
    finally:
        await store.close()


def _tamper(data_dir: Path, *statements: str) -> None:
    with sqlite3.connect(data_dir / "hub.db") as conn:
        for statement in statements:
            conn.execute(statement)


async def _verify(data_dir: Path) -> Any:
    return await asyncio.to_thread(
        agenthub, "audit", "verify", "--data-dir", str(data_dir), cwd=data_dir.parent
    )


# the chain ---------------------------------------------------------------------------------


async def test_each_entry_hashes_its_fields_chained_to_the_one_before(store: Store) -> None:
    log = AuditLog(store)
    first = await log.append(_action(1))
    second = await log.append(_action(2))
    assert (first["id"], second["id"]) == (1, 2)
    assert first["prev_hash"] == GENESIS
    assert second["prev_hash"] == first["hash"]
    assert entry_hash(GENESIS, first) == first["hash"]
    stored = await store.audit_entries(after_id=0, limit=10)
    assert stored == [first, second]  # what is read back hashes the same
    report = await log.verify()
    assert (report.intact, report.count, report.head) == (True, 2, second["hash"])


async def test_an_empty_log_is_intact(store: Store) -> None:
    report = await AuditLog(store).verify()
    assert (report.intact, report.count, report.head) == (True, 0, GENESIS)


async def test_concurrent_appenders_keep_one_chain(store_settings: Settings, store: Store) -> None:
    # A second store on the same database stands for the CLI, or another node, writing while the hub runs.
    other = create_store(store_settings)
    await other.open()
    try:
        await asyncio.gather(
            *(AuditLog(store).append(_action(n, actor="hub")) for n in range(150)),
            *(AuditLog(other).append(_action(n, actor="cli")) for n in range(150)),
        )
    finally:
        await other.close()
    entries = await store.audit_entries(after_id=0, limit=1000)
    assert [entry["id"] for entry in entries] == list(range(1, 301))
    assert len({entry["prev_hash"] for entry in entries}) == 300  # no two entries share a parent
    report = await AuditLog(store).verify()
    assert (report.intact, report.count) == (True, 300)


# `agenthub audit verify` on a real file --------------------------------------------------


async def test_verify_passes_an_intact_chain(tmp_path: Path) -> None:
    await _chain(tmp_path / "data", 5)
    result = await _verify(tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert "audit log intact: 5 entries" in result.stdout


async def test_verify_names_the_entry_whose_field_was_changed(tmp_path: Path) -> None:
    await _chain(tmp_path / "data", 5)
    _tamper(tmp_path / "data", "UPDATE audit_log SET actor = 'mallory' WHERE id = 3")
    result = await _verify(tmp_path / "data")
    assert result.returncode == 1
    assert "BROKEN at entry 3" in result.stdout
    assert "altered" in result.stdout
    assert "Traceback" not in result.stderr


async def test_verify_names_the_entry_after_a_deleted_one(tmp_path: Path) -> None:
    await _chain(tmp_path / "data", 5)
    _tamper(tmp_path / "data", "DELETE FROM audit_log WHERE id = 3")
    result = await _verify(tmp_path / "data")
    assert result.returncode == 1
    assert "BROKEN at entry 4: entry 3 missing" in result.stdout


async def test_verify_catches_a_rewritten_entry_at_the_next_link(tmp_path: Path) -> None:
    # The forger fixes entry 2's own hash after changing it; entry 3 still points at the old one.
    await _chain(tmp_path / "data", 4)
    with sqlite3.connect(tmp_path / "data" / "hub.db") as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM audit_log WHERE id = 2").fetchone())
        row.update(status=404, target=json.loads(row["target"]))
        conn.execute(
            "UPDATE audit_log SET status = 404, hash = ? WHERE id = 2", (entry_hash(row["prev_hash"], row),)
        )
    result = await _verify(tmp_path / "data")
    assert result.returncode == 1
    assert "BROKEN at entry 3: prev_hash does not match the hash of entry 2" in result.stdout


def test_verify_without_a_database_says_where_it_looked(tmp_path: Path) -> None:
    result = agenthub("audit", "verify", "--data-dir", "elsewhere", cwd=tmp_path)
    assert result.returncode == 2
    assert "no hub database at elsewhere/hub.db" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_new_commands_have_help(tmp_path: Path) -> None:
    for command in (["audit"], ["audit", "verify"], ["token", "revoke"]):
        result = agenthub(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0
        assert "usage: agenthub" in result.stdout


def test_token_revoke_refuses_a_malformed_id_in_one_line(tmp_path: Path) -> None:
    result = agenthub("token", "revoke", "not a jti!", "--data-dir", "state", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid token id 'not a jti!'" in result.stderr
    assert "Traceback" not in result.stderr


# CLI actions are recorded ----------------------------------------------------------------


async def test_cli_token_create_and_certs_issue_are_recorded_without_the_token(tmp_path: Path) -> None:
    created = agenthub(
        "token", "create", "--scope", "hub:read", "--subject", "alice", "--data-dir", "state", cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    as_json = json.loads(
        agenthub(
            "token", "create", "--scope", "hub:admin", "--json", "--data-dir", "state", cwd=tmp_path
        ).stdout
    )
    assert set(as_json) == {"token", "jti", "subject", "scope", "expires_at"}
    assert agenthub("certs", "init", "--dir", "pki", cwd=tmp_path).returncode == 0
    issued = agenthub("certs", "issue", "web-01", "--dir", "pki", "--data-dir", "state", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr

    store = SqliteStore(tmp_path / "state" / "hub.db")
    await store.open()
    try:
        entries = await store.audit_entries(after_id=0, limit=10)
    finally:
        await store.close()
    assert [(e["action"], e["method"], e["path"]) for e in entries] == [
        ("create_token", "CLI", "agenthub token create"),
        ("create_token", "CLI", "agenthub token create"),
        ("issue_certificate", "CLI", "agenthub certs issue"),
    ]
    jti = created.stderr.split("(jti) ")[1].split(",")[0]
    assert entries[0]["target"]["jti"] == jti
    assert entries[0]["target"]["subject"] == "alice"
    assert entries[1]["target"]["jti"] == as_json["jti"]
    assert entries[2]["target"]["agent_id"] == "web-01"
    assert entries[0]["actor"].startswith("local:")
    assert all(entry["client"] == "local" for entry in entries)
    raw = b"".join(path.read_bytes() for path in (tmp_path / "state").glob("hub.db*"))
    assert token.encode() not in raw
    assert as_json["token"].encode() not in raw


# API writes are recorded -----------------------------------------------------------------


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _audit_page(http: aiohttp.ClientSession, admin: str, **params: str) -> dict[str, Any]:
    async with http.get("/api/v1/audit", params=params, headers=_auth(admin)) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
    return body


async def test_api_writes_are_recorded_with_actor_action_target_and_status(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    admin = issue_token(hub.settings, scopes=["hub:admin"], subject="root")
    victim = issue_token(hub.settings, scopes=["hub:read"], subject="bob")
    url = f"/api/v1/tokens/{victim.jti}:revoke"
    async with http.post(url, json={"reason": "left the team"}, headers=_auth(admin.token)) as response:
        assert response.status == 200
        correlation_id = response.headers["X-Correlation-ID"]
    async with http.post(url, json={"colour": "red"}, headers=_auth(admin.token)) as response:
        assert response.status == 422
    # Not recorded: reads, and refusals before the handler (no valid token, missing scope).
    async with http.get("/api/v1/agents", headers=_auth(admin.token)) as response:
        assert response.status == 200
    async with http.post(url, json={}) as response:
        assert response.status == 401
    async with http.post(url, json={}, headers=_auth(hub.token("hub:read"))) as response:
        assert response.status == 403

    entries = (await _audit_page(http, admin.token))["data"]
    assert [(e["action"], e["status"]) for e in entries] == [("revoke_token", 422), ("revoke_token", 200)]
    done = entries[1]
    assert done["actor"] == "root"
    assert done["token_id"] == admin.jti
    assert (done["method"], done["path"]) == ("POST", "/api/v1/tokens/{jti}:revoke")
    assert done["target"] == {"jti": victim.jti}
    assert done["correlation_id"] == correlation_id
    assert done["client"] == "127.0.0.1"
    assert "left the team" not in json.dumps(entries)  # never the body
    assert entries[0]["prev_hash"] == done["hash"]


async def test_the_audit_log_is_for_admins_only(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    for scope in ("hub:read", "hub:write"):
        async with http.get("/api/v1/audit", headers=_auth(hub.token(scope))) as response:
            assert response.status == 403
    async with http.get("/api/v1/audit", headers=_auth(hub.token("hub:admin"))) as response:
        assert response.status == 200


async def test_audit_list_filters_and_pages_newest_first(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    log = AuditLog(hub.store)
    for n in range(5):
        await log.append(_action(n, actor="alice" if n % 2 == 0 else "bob"))
    await log.append(cli_action("revoke_token", "agenthub token revoke", {"jti": "x"}))
    admin = hub.token("hub:admin")

    ids: list[int] = []
    params = {"limit": "2"}
    while True:
        body = await _audit_page(http, admin, **params)
        ids += [entry["id"] for entry in body["data"]]
        if not body["pagination"]["has_more"]:
            break
        params["cursor"] = body["pagination"]["cursor"]
    assert ids == [6, 5, 4, 3, 2, 1]
    alice = (await _audit_page(http, admin, actor="alice"))["data"]
    assert [entry["id"] for entry in alice] == [5, 3, 1]
    revocations = (await _audit_page(http, admin, action="revoke_token"))["data"]
    assert [entry["method"] for entry in revocations] == ["CLI"]
    assert (await _audit_page(http, admin, since="4102444800"))["data"] == []  # the year 2100


async def test_a_cli_revocation_reaches_the_running_hub(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    issued = issue_token(hub.settings, scopes=["hub:read"], subject="carol")
    async with http.get("/api/v1/agents", headers=_auth(issued.token)) as response:
        assert response.status == 200  # known not revoked: cached for a moment
    result = await asyncio.to_thread(
        agenthub, "token", "revoke", issued.jti, "--reason", "laptop lost",
        cwd=hub.settings.data_dir.parent, env=hub_env(hub.settings),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for _ in range(100):  # the cache keeps "not revoked" for about a second
        async with http.get("/api/v1/agents", headers=_auth(issued.token)) as response:
            if response.status == 401:
                assert (await response.json())["detail"] == "the token has been revoked"
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the hub still accepts a token revoked with the CLI 10 s ago")
    entries = (await _audit_page(http, hub.token("hub:admin"), action="revoke_token"))["data"]
    assert entries[0]["target"] == {"jti": issued.jti}
    assert entries[0]["method"] == "CLI"
