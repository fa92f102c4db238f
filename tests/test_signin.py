"""Operator accounts and web sessions over real HTTP: sign-in, cookies, CSRF, lockout, roles, sign-out."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from hub.keys import USERS
from tests.conftest import HubStarter, RunningHub, client_ssl, free_port, hub_env
from tests.test_cli import agenthub, assert_user_error

PASSWORD = "correct horse battery staple"


async def users_cli(
    *args: str, cwd: Path, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`agenthub users ...` in a thread: the hub under test shares this event loop and must keep
    serving (a hub stalled inside a write would hold the store's write lock against the CLI)."""
    return await asyncio.to_thread(agenthub, "users", *args, cwd=cwd, env=env, stdin=stdin)


SESSION_COOKIE = "__Host-agenthub_session"


class Browser:
    """A cookie-keeping HTTP client that signs in the way the sign-in page does."""

    def __init__(self, url: str, ca: Path) -> None:
        self.http = aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(ssl=client_ssl(ca)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # 127.0.0.1 is an IP address
        )

    async def sign_in(self, name: str, password: str, *, next_path: str = "/") -> aiohttp.ClientResponse:
        async with self.http.get("/signin", params={"next": next_path}) as page:
            token = re.search(r'name="csrf_token" value="([^"]+)"', await page.text())
        assert token is not None
        form = {"csrf_token": token[1], "next": next_path, "username": name, "password": password}
        async with self.http.post("/signin", data=form, allow_redirects=False) as response:
            await response.read()
            return response

    async def csrf_token(self) -> str:
        """Read the session's CSRF token from a page, as the pages' scripts do."""
        async with self.http.get("/alerts") as page:
            found = re.search(r'<meta name="csrf-token" content="([^"]+)"', await page.text())
        assert found is not None
        return found[1]

    async def api(
        self, method: str, path: str, *, csrf: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": csrf} if csrf else {}
        async with self.http.request(
            method, path, json=body, headers=headers, allow_redirects=False
        ) as response:
            return response.status, await response.json(content_type=None) if response.status != 204 else None


Browse = Callable[[], Browser]


@pytest.fixture
async def browse(hub: RunningHub) -> AsyncIterator[Browse]:
    opened: list[Browser] = []

    def open_browser() -> Browser:
        opened.append(Browser(hub.url, hub.certs / "ca.pem"))
        return opened[-1]

    yield open_browser
    for browser in opened:
        await browser.http.close()


AddUser = Callable[..., Awaitable[None]]


@pytest.fixture
def add_user(hub: RunningHub) -> AddUser:
    async def add(name: str, role: str = "viewer", password: str = PASSWORD) -> None:
        await hub.app[USERS].add(name, role=role, password=password)

    return add


async def test_sign_in_sets_a_strict_session_cookie_and_goes_to_next(
    hub: RunningHub, browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice", "operator")
    browser = browse()
    response = await browser.sign_in("alice", PASSWORD, next_path="/alerts?severity=HIGH")
    assert response.status == 303
    assert response.headers["Location"] == "/alerts?severity=HIGH"
    cookie = SimpleCookie(next(h for h in response.headers.getall("Set-Cookie") if SESSION_COOKIE in h))
    morsel = cookie[SESSION_COOKIE]
    assert morsel["httponly"]
    assert morsel["secure"]
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert not morsel["domain"]
    status, body = await browser.api("GET", "/api/v1/agents")
    assert status == 200, body
    assert body["data"] == []
    stored = await hub.store.get_user("alice")
    assert stored["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in str(stored)


@pytest.mark.parametrize("name", ["alice", "nobody"])
async def test_a_wrong_password_or_name_is_refused_alike(
    browse: Browse, add_user: AddUser, name: str
) -> None:
    await add_user("alice")
    browser = browse()
    response = await browser.sign_in(name, "not the password at all")
    assert response.status == 401
    async with browser.http.get("/api/v1/agents") as api:
        assert api.status == 401
    async with browser.http.get("/", allow_redirects=False) as page:
        assert page.status == 303
        assert page.headers["Location"] == "/signin?next=/"


async def test_the_refusal_is_shown_on_the_form(hub: RunningHub, browse: Browse, add_user: AddUser) -> None:
    await add_user("alice")
    browser = browse()
    async with browser.http.get("/signin") as page:
        token = re.search(r'name="csrf_token" value="([^"]+)"', await page.text())
    assert token is not None
    form = {"csrf_token": token[1], "username": "alice", "password": "wrong password here"}
    async with browser.http.post("/signin", data=form) as response:
        text = await response.text()
    assert response.status == 401
    assert "wrong user name or password" in text
    assert 'value="alice"' in text


async def test_a_sign_in_post_without_the_form_token_is_refused(browse: Browse, add_user: AddUser) -> None:
    await add_user("alice")
    browser = browse()
    form = {"username": "alice", "password": PASSWORD}
    async with browser.http.post("/signin", data=form, allow_redirects=False) as response:
        assert response.status == 403
        assert "expired" in await response.text()
    async with browser.http.get("/api/v1/agents") as api:
        assert api.status == 401


async def test_cookie_writes_need_the_sessions_csrf_token(browse: Browse, add_user: AddUser) -> None:
    await add_user("olga", "operator")
    browser = browse()
    await browser.sign_in("olga", PASSWORD)
    status, body = await browser.api("POST", "/api/v1/alerts/1:acknowledge", body={})
    assert status == 403
    assert "X-CSRF-Token" in body["detail"]
    status, body = await browser.api("POST", "/api/v1/alerts/1:acknowledge", csrf="forged" * 8, body={})
    assert status == 403
    status, body = await browser.api(
        "POST", "/api/v1/alerts/1:acknowledge", csrf=await browser.csrf_token(), body={}
    )
    assert status == 404  # past authentication and scope: there is just no such alert


async def test_roles_map_to_scopes(browse: Browse, add_user: AddUser) -> None:
    await add_user("vera", "viewer")
    await add_user("olga", "operator")
    await add_user("ada", "admin")
    answers = {}
    for name in ("vera", "olga", "ada"):
        browser = browse()
        await browser.sign_in(name, PASSWORD)
        csrf = await browser.csrf_token()
        write, _ = await browser.api("POST", "/api/v1/alerts/1:acknowledge", csrf=csrf, body={})
        admin, _ = await browser.api("GET", "/api/v1/webhooks")
        answers[name] = (write, admin)
    assert answers == {"vera": (403, 403), "olga": (404, 403), "ada": (404, 200)}


async def test_repeated_failures_lock_the_account_until_unlocked(
    hub_with: HubStarter, tmp_path: Path
) -> None:
    hub = await hub_with({"signin_max_failures": 3, "signin_lockout_s": 30.0})
    await hub.app[USERS].add("alice", role="viewer", password=PASSWORD)
    browser = Browser(hub.url, hub.certs / "ca.pem")
    try:
        statuses = [(await browser.sign_in("alice", "wrong password!")).status for _ in range(3)]
        assert statuses == [401, 401, 429]
        locked = await browser.sign_in("alice", PASSWORD)  # even the right password waits
        assert locked.status == 429
        assert 25 <= int(locked.headers["Retry-After"]) <= 30
        env = hub_env(hub.settings)
        listed = await users_cli("list", cwd=tmp_path, env=env)
        assert re.search(r"alice\s+viewer\s+never\s+locked \d+ s", listed.stdout), listed.stdout
        assert (await users_cli("unlock", "alice", cwd=tmp_path, env=env)).returncode == 0
        assert (await browser.sign_in("alice", PASSWORD)).status == 303
    finally:
        await browser.http.close()


async def test_sign_out_ends_the_session_everywhere(
    hub: RunningHub, browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    browser = browse()
    await browser.sign_in("alice", PASSWORD)
    stolen = next(c.value for c in browser.http.cookie_jar if c.key == SESSION_COOKIE)
    csrf = await browser.csrf_token()
    async with browser.http.post("/signout", data={"csrf_token": "wrong"}, allow_redirects=False) as refused:
        assert refused.status == 403
    async with browser.http.post("/signout", data={"csrf_token": csrf}, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/signin"
    replay = browse()
    replay.http.cookie_jar.update_cookies({SESSION_COOKIE: stolen})
    assert (await replay.api("GET", "/api/v1/agents"))[0] == 401


async def test_next_never_leaves_the_hub(browse: Browse, add_user: AddUser) -> None:
    await add_user("alice")
    for target in ("//evil.example/", "/\\evil.example", "https://evil.example/"):
        response = await browse().sign_in("alice", PASSWORD, next_path=target)
        assert response.headers["Location"] == "/"


async def test_pages_redirect_to_sign_in_and_carry_security_headers(
    browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    browser = browse()
    async with browser.http.get("/alerts", allow_redirects=False) as anonymous:
        assert anonymous.status == 303
        assert anonymous.headers["Location"] == "/signin?next=/alerts"
    await browser.sign_in("alice", PASSWORD)
    async with browser.http.get("/alerts") as page:
        assert page.status == 200
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["X-Frame-Options"] == "DENY"


async def test_the_dashboard_socket_takes_the_session_and_closes_at_sign_out(
    hub: RunningHub, browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    browser = browse()
    await browser.sign_in("alice", PASSWORD)
    csrf = await browser.csrf_token()
    async with browser.http.ws_connect("/ws/live", origin=hub.url) as ws:
        first = await ws.receive_json(timeout=5)
        assert first["type"] == "snapshot"
        async with browser.http.post("/signout", data={"csrf_token": csrf}, allow_redirects=False):
            pass
        while True:  # stats pushes may come before the close
            message = await ws.receive(timeout=5)
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                break
    assert ws.close_code == 1008


async def test_a_role_change_or_removal_reaches_open_sessions(
    hub: RunningHub, browse: Browse, add_user: AddUser, tmp_path: Path
) -> None:
    await add_user("vera", "viewer")
    browser = browse()
    await browser.sign_in("vera", PASSWORD)
    env = hub_env(hub.settings)
    assert (await browser.api("GET", "/api/v1/webhooks"))[0] == 403
    assert (await users_cli("role", "vera", "admin", cwd=tmp_path, env=env)).returncode == 0
    assert (await browser.api("GET", "/api/v1/webhooks"))[0] == 200
    assert (await users_cli("remove", "vera", cwd=tmp_path, env=env)).returncode == 0
    assert (await browser.api("GET", "/api/v1/webhooks"))[0] == 401


async def test_users_cli_reads_the_password_from_stdin_and_refuses_bad_input(
    hub: RunningHub, tmp_path: Path
) -> None:
    env = hub_env(hub.settings)
    added = await users_cli(
        "add", "carol", "--role", "operator", cwd=tmp_path, env=env, stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    assert "carol added with role operator" in added.stdout
    assert PASSWORD not in added.stdout + added.stderr
    await hub.app[USERS].authenticate("carol", PASSWORD)
    cases = {
        ("add", "carol", "--role", "viewer"): (PASSWORD, "already exists"),
        ("add", "dave", "--role", "viewer"): ("short", "at least 12 characters"),
        ("add", "-bad name", "--role", "viewer"): (PASSWORD, "user name '-bad name' is not valid"),
        ("passwd", "nobody"): (PASSWORD, "no user 'nobody'"),
    }
    for args, (stdin, words) in cases.items():
        result = await users_cli(*args, cwd=tmp_path, env=env, stdin=stdin + "\n")
        assert_user_error(result, words)
    bad_role = await users_cli("add", "erin", "--role", "root", cwd=tmp_path, env=env, stdin=PASSWORD)
    assert bad_role.returncode == 2
    assert "invalid choice: 'root'" in bad_role.stderr
    changed = await users_cli("passwd", "carol", cwd=tmp_path, env=env, stdin="a brand new password\n")
    assert changed.returncode == 0
    await hub.app[USERS].authenticate("carol", "a brand new password")


async def test_make_run_demo_prints_a_sign_in_that_works(tmp_path: Path) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    demo = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "hub.cli",
            "demo",
            "--port",
            str(port),
            "--data-dir",
            "data",
            "--certs-dir",
            "certs",
        ],
        cwd=tmp_path,
        env=clean,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert demo.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"Dashboard:" not in (line := await demo.stdout.readline()):
                assert line, "the demo ended without printing the dashboard"
        found = re.search(r"user admin, password (\S+)\)", line.decode())
        assert found is not None, line
        browser = Browser(f"https://127.0.0.1:{port}", tmp_path / "certs" / "ca.pem")
        try:
            assert (await browser.sign_in("admin", found[1])).status == 303
            await _until_online(browser, "demo-agent")
        finally:
            await browser.http.close()
    finally:
        demo.send_signal(signal.SIGINT)
        await asyncio.wait_for(demo.wait(), 30)
    assert demo.returncode == 0


async def _until_online(browser: Browser, agent_id: str) -> None:
    agents: Any = None
    for _ in range(100):
        _, agents = await browser.api("GET", "/api/v1/agents")
        if [a["status"] for a in agents["data"] if a["agent_id"] == agent_id] == ["online"]:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"{agent_id} did not come online: {agents}")


async def test_a_burst_of_guesses_gets_no_further_than_guesses_in_a_row(hub_with: HubStarter) -> None:
    hub = await hub_with({"signin_max_failures": 3})
    await hub.app[USERS].add("alice", role="admin", password=PASSWORD)
    await hub.app[USERS].add("bob", role="viewer", password=PASSWORD)
    browser = Browser(hub.url, hub.certs / "ca.pem")
    try:
        guesses = [browser.sign_in("alice", f"guess number {n:04d}") for n in range(12)]
        statuses = [r.status for r in await asyncio.gather(*guesses, browser.sign_in("alice", PASSWORD))]
        assert statuses[:2] == [401, 401]
        assert set(statuses[2:]) == {429}  # the right password came too late: the account was locked
        # A name that is no account answers exactly the same way.
        unknown = [(await browser.sign_in("mallory", f"guess number {n:04d}")).status for n in range(4)]
        assert unknown == [401, 401, 429, 429]
        other = await browser.sign_in("bob", PASSWORD)  # other accounts are not held up
        assert other.status == 303
    finally:
        await browser.http.close()


async def test_refused_sign_ins_name_only_accounts_in_the_audit_log(
    hub: RunningHub, browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    await browse().sign_in("alice", "wrong password here")
    await browse().sign_in("Tr0ub4dor.and-3xtra", "the name field held the password")
    entries = await hub.store.audit_entries(after_id=0, limit=10)
    assert [(e["actor"], e["status"]) for e in entries] == [("user:alice", 401), ("user:?", 401)]


async def test_sign_in_forms_are_small_and_next_cannot_hide_another_host(
    browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    browser = browse()
    form = {"username": "alice", "password": "x" * 20_000}
    async with browser.http.post("/signin", data=form, allow_redirects=False) as response:
        assert response.status == 413
    for target in ("/\t/evil.example/", "/\n/evil.example", "/%09/ok"):
        response = await browse().sign_in("alice", PASSWORD, next_path=target)
        assert response.headers["Location"] == ("/%09/ok" if target == "/%09/ok" else "/")


async def test_session_answers_are_not_cached_and_other_ports_cannot_open_the_feed(
    hub: RunningHub, browse: Browse, add_user: AddUser
) -> None:
    await add_user("alice")
    browser = browse()
    await browser.sign_in("alice", PASSWORD)
    async with browser.http.get("/api/v1/agents") as response:
        assert response.headers["Cache-Control"] == "no-store"
    other_port = hub.url.rsplit(":", 1)[0] + ":1"
    for origin in (other_port, "http://[::1", hub.url.replace("https:", "http:")):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await browser.http.ws_connect("/ws/live", origin=origin)
        assert refused.value.status == 403
