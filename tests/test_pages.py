"""The pages in a real browser: Debian's headless Chromium, driven by Playwright, against the real hub.

Every test fails on a browser console error it did not expect (a step that provokes one, such
as a refused sign-in answered 401, names what it expects), and leaves screenshots of what it
saw in `test-artifacts/pages/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright, expect

from bench.harness import CHROMIUM_FLAGS
from hub.config import Settings
from hub.keys import BUS, USERS
from tests.conftest import (
    ConnectAgent,
    HubStarter,
    RunningHub,
    free_port,
    open_agent,
    require_tool,
)
from tests.test_cli import agenthub
from tests.test_scoring import attack

PASSWORD = "correct horse battery staple"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "pages"
LIVE_WITHIN_MS = 2000


class Operator:
    """One person at one browser tab: signs in, opens pages, keeps every console error."""

    def __init__(self, page: Page, url: str, test_name: str) -> None:
        self.page = page
        self.url = url
        self._test_name = test_name
        self._tolerated: list[re.Pattern[str]] = []
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning") and not any(p.search(message.text) for p in self._tolerated):
            self.errors.append(f"{message.type}: {message.text}")

    @contextlib.contextmanager
    def expecting_console(self, *patterns: str) -> Iterator[None]:
        """Tolerate console errors matching `patterns` for the length of one step that provokes them."""
        compiled = [re.compile(p) for p in patterns]
        self._tolerated.extend(compiled)
        try:
            yield
        finally:
            for pattern in compiled:
                self._tolerated.remove(pattern)

    async def open(self, path: str) -> None:
        await self.page.goto(self.url + path)

    async def sign_in(self, name: str, password: str = PASSWORD) -> None:
        await self.open("/signin")
        await self.page.fill("input[name=username]", name)
        await self.page.fill("input[name=password]", password)
        await self.page.click("#signin-form button[type=submit]")

    async def csrf(self) -> str:
        token = await self.page.get_attribute("meta[name=csrf-token]", "content")
        assert token
        return token

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=ARTIFACTS / f"{self._test_name}-{name}.png", full_page=True)


OpenOperator = Callable[..., Awaitable[Operator]]


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    executable = require_tool("chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()


@pytest.fixture
async def operator_at(chromium: Browser, request: pytest.FixtureRequest) -> AsyncIterator[OpenOperator]:
    """Open browser tabs on a hub's URL, one context (cookie jar) each; fail on unexpected console errors."""
    contexts: list[BrowserContext] = []
    operators: list[Operator] = []

    async def open_tab(url: str) -> Operator:
        # The hub's certificate comes from the tests' own CA, which this browser does not know.
        context = await chromium.new_context(
            ignore_https_errors=True, viewport={"width": 1400, "height": 900}
        )
        contexts.append(context)
        operators.append(Operator(await context.new_page(), url, request.node.name))
        return operators[-1]

    yield open_tab
    for context in contexts:
        await context.close()
    errors = [error for operator in operators for error in operator.errors]
    assert not errors, "browser console errors:\n" + "\n".join(errors)


async def add_users(hub: RunningHub) -> None:
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        await hub.app[USERS].add(name, role=role, password=PASSWORD)


async def signed_in(operator_at: OpenOperator, url: str, name: str) -> Operator:
    operator = await operator_at(url)
    await operator.sign_in(name)
    await expect(operator.page.locator("#conn")).to_have_text("live", timeout=5000)
    return operator


async def test_sign_in_refuses_a_wrong_password_and_viewers_get_no_admin_actions(
    hub: RunningHub, operator_at: OpenOperator
) -> None:
    await add_users(hub)
    viewer = await operator_at(hub.url)
    await viewer.open("/certificates")
    await expect(viewer.page).to_have_url(re.compile(r"/signin\?next=/certificates$"))
    await viewer.screenshot("signin")
    with viewer.expecting_console("status of 401"):
        await viewer.page.fill("input[name=username]", "vera")
        await viewer.page.fill("input[name=password]", "not the password")
        await viewer.page.click("#signin-form button[type=submit]")
        await expect(viewer.page.locator("#signin-error")).to_have_text("wrong user name or password")
    await viewer.page.fill("input[name=password]", PASSWORD)
    await viewer.page.click("#signin-form button[type=submit]")
    await expect(viewer.page).to_have_url(hub.url + "/certificates")
    await expect(viewer.page.locator("#certificates")).to_be_visible()
    assert await viewer.page.locator("#upload-form").count() == 0
    await viewer.open("/webhooks")
    assert await viewer.page.locator("form").filter(has=viewer.page.locator("input[name=url]")).count() == 0
    # Not shown, and refused anyway: the API checks the session's role itself.
    csrf = await viewer.csrf()
    refused = await viewer.page.request.post(
        hub.url + "/api/v1/ca:rotate", headers={"X-CSRF-Token": csrf}, data={}
    )
    assert refused.status == 403

    admin = await signed_in(operator_at, hub.url, "ada")
    await admin.open("/certificates")
    await expect(admin.page.locator("#upload-form")).to_be_visible()
    await admin.page.click("form.signout button")
    await expect(admin.page).to_have_url(re.compile(r"/signin"))
    await admin.open("/")
    await expect(admin.page).to_have_url(re.compile(r"/signin\?next=/$"))


async def test_an_agent_and_its_attack_appear_live_without_a_reload(
    hub: RunningHub, operator_at: OpenOperator, connect_agent: ConnectAgent
) -> None:
    await add_users(hub)
    admin = await signed_in(operator_at, hub.url, "ada")
    page = admin.page
    await page.evaluate("window.loadedOnce = true")  # gone if the page reloads

    agent = await connect_agent("agent-1")
    row = page.locator('#agents tr[data-agent-id="agent-1"]')
    await expect(row.locator(".status")).to_have_text("online", timeout=LIVE_WITHIN_MS)
    await expect(page.locator("#agents-online")).to_have_text("1")

    ack = await agent.send({"events": attack(t0=time.time() - 4)})
    assert ack["accepted"] == 4
    top = page.locator("#top-processes tr[data-process-key]").first
    await expect(top).to_contain_text("agent-1:200", timeout=LIVE_WITHIN_MS)
    score = float(re.findall(r"\d+\.\d", await top.locator(".score").inner_text())[0])
    assert score > 80
    await expect(top.locator(".why")).to_contain_text("Shell spawned by a web server")
    alert = page.locator("#alert-feed [data-alert-id]").first
    await expect(alert).to_contain_text(re.compile("HIGH|CRITICAL"), timeout=LIVE_WITHIN_MS)
    await expect(alert).to_contain_text(re.compile(r"T\d{4}"))
    assert await page.evaluate("window.loadedOnce") is True
    await admin.screenshot("overview")


async def test_the_agent_page_explains_scores_charts_heartbeats_and_runs_commands(
    hub: RunningHub, operator_at: OpenOperator
) -> None:
    await add_users(hub)

    async def on_command(command: dict[str, Any]) -> dict[str, Any]:
        return {"id": command["id"], "ok": True, "result": {"pong": command["args"]}, "error": None}

    agent = await open_agent(hub, "agent-1", handlers={"command": on_command})
    try:
        for load in (12.5, 40.0, 22.0):
            beat = {"ts": time.time(), "cpu_percent": load, "mem_percent": 50.0, "disk_percent": 70.0,
                    "spool_depth": 0, "dropped": 0, "uptime_s": 100.0}  # fmt: skip
            await agent.send(beat, "heartbeat")
        await agent.send({"events": attack(t0=time.time() - 4)})
        await hub.settle()

        operator = await signed_in(operator_at, hub.url, "otto")
        page = operator.page
        await operator.open("/agents/agent-1")
        await expect(page.locator("#agent-status")).to_contain_text("online")
        await expect(page.locator("#heartbeat-chart canvas").first).to_be_visible()
        shell = page.locator("#processes tr[data-process-key]").filter(has_text="/bin/sh")
        await expect(shell).to_contain_text("reverse-shell port +")
        await shell.click()
        tree = page.locator("#process-tree")
        await expect(tree).to_contain_text("/usr/sbin/nginx")
        await expect(tree).to_contain_text("/bin/sh")
        await expect(page.locator("#events")).to_contain_text("/etc/shadow")

        await page.fill("#command-form [name=name]", "ping")
        await page.click("#command-form button[type=submit]")
        await expect(page.locator("#command-result")).to_contain_text("pong", timeout=5000)
        await operator.screenshot("agent")
    finally:
        await agent.close()


async def test_certificates_show_the_cn_mismatch_and_a_revoked_agent_goes_offline(
    hub: RunningHub, operator_at: OpenOperator, connect_agent: ConnectAgent
) -> None:
    await add_users(hub)
    await connect_agent("agent-1")
    admin = await signed_in(operator_at, hub.url, "ada")
    page = admin.page
    await admin.open("/certificates")
    form = page.locator("#upload-form")
    await form.locator("[name=agent_id]").fill("agent-1")
    await form.locator("[name=pem]").fill((hub.certs / "agent-2.pem").read_text())
    with admin.expecting_console("status of 422"):
        await form.locator("button[type=submit]").click()
        await expect(form.locator('.field-error[data-field="agent_id"]')).to_have_text(
            "Agent ID mismatch: provided 'agent-1' but certificate CN is 'agent-2'"
        )
    await form.locator("[name=pem]").fill((hub.certs / "agent-1.pem").read_text())
    await form.locator("button[type=submit]").click()
    listed = page.locator("#certificates tr[data-fingerprint]").filter(has_text="agent-1")
    await expect(listed).to_have_count(1)
    await admin.screenshot("certificates")

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-7")])
    )
    sign = page.locator("#sign-form")
    await sign.locator("[name=agent_id]").fill("agent-7")
    await sign.locator("[name=csr]").fill(csr.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM).decode())
    await sign.locator("button[type=submit]").click()
    await expect(page.locator("#issued .issued-certificate")).to_have_value(re.compile("BEGIN CERTIFICATE"))
    await expect(page.locator("#certificates tr[data-fingerprint]").filter(has_text="agent-7")).to_have_count(
        1
    )

    await listed.locator(".revoke").click()
    await page.locator("#revoke-dialog [name=reason]").fill("host decommissioned")
    await page.locator(".confirm-revoke").click()
    await expect(listed).to_contain_text("revoked")
    await admin.open("/")
    status = page.locator('#agents tr[data-agent-id="agent-1"] .status')
    await expect(status).to_have_text("offline", timeout=LIVE_WITHIN_MS)
    await expect(page.locator("#agents-offline")).to_have_text("1")


async def test_alerts_are_filtered_acknowledged_and_resolved(
    hub: RunningHub, operator_at: OpenOperator, connect_agent: ConnectAgent
) -> None:
    await add_users(hub)
    agent = await connect_agent("agent-1")
    await agent.send({"events": attack(t0=time.time() - 4)})
    await hub.settle()
    operator = await signed_in(operator_at, hub.url, "otto")
    page = operator.page
    await operator.open("/alerts")
    rows = page.locator("[data-alert-id]")
    await expect(rows.first).to_be_visible()
    await expect(rows.first).to_contain_text(re.compile(r"T\d{4}"))
    await operator.screenshot("alerts")
    first_id = await rows.first.get_attribute("data-alert-id")
    row = page.locator(f'[data-alert-id="{first_id}"]')
    await row.locator(".ack").click()
    await expect(row).to_contain_text("acknowledged")
    await row.locator(".resolve").click()
    await expect(row).to_contain_text("resolved")
    stored = await hub.store.get_alert(int(first_id or 0))
    assert stored["status"] == "resolved"


async def test_webhooks_page_adds_a_subscription_sends_a_test_and_shows_deliveries(
    hub_with: HubStarter, operator_at: OpenOperator
) -> None:
    received: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/agenthub", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/agenthub"
    try:
        local = ipaddress.ip_network("127.0.0.0/8")  # the receiver is local, and plain HTTP
        hub = await hub_with({"webhook_allow": [local], "webhook_allow_http": True})
        await add_users(hub)
        admin = await signed_in(operator_at, hub.url, "ada")
        page = admin.page
        await admin.open("/webhooks")
        await page.fill("input[name=url]", url)
        await page.locator("form:has(input[name=url]) button[type=submit]").click()
        row = page.locator("#webhooks tr[data-webhook-id]").filter(has_text=url)
        await expect(row).to_have_count(1)
        await expect(page.locator("#webhook-secret .secret")).to_have_value(re.compile(r"\S{20,}"))
        await row.locator(".test-send").click()
        await expect(row.locator("td.deliveries")).to_contain_text("last 204", timeout=10_000)
        delivery = page.locator("#deliveries tr[data-delivery-id]").first
        await expect(delivery).to_contain_text("ping")
        await expect(delivery).to_contain_text("delivered")
        assert [body["event_type"] for body in received] == ["ping"]
        await admin.screenshot("webhooks")
    finally:
        await runner.cleanup()


async def test_the_page_reconnects_by_itself_after_the_hub_is_killed_and_restarted(
    settings: Settings, operator_at: OpenOperator, tmp_path: Path
) -> None:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("HUB_")},
        "HUB_DATA_DIR": str(settings.data_dir),
        "HUB_CERTS_DIR": str(settings.certs_dir),
        "HUB_JWT_SECRET": "test-secret-" + "k" * 40,
        "HUB_PORT": str(port),
    }
    added = agenthub("users", "add", "ada", "--role", "admin", cwd=tmp_path, env=env, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    hub = await _serve(env, port)
    certs = settings.certs_dir
    identity = [
        "--cert",
        str(certs / "agent-1.pem"),
        "--key",
        str(certs / "agent-1.key"),
        "--ca",
        str(certs / "ca.pem"),
    ]
    agent = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "agent_client.cli", "run", "--hub", url, *identity],
        *["--spool", str(tmp_path / "spool.db")],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        admin = await signed_in(operator_at, url, "ada")
        status = admin.page.locator('#agents tr[data-agent-id="agent-1"] .status')
        await expect(status).to_have_text("online", timeout=15_000)
        badge = admin.page.locator("#conn")
        with admin.expecting_console(r"WebSocket connection to .* failed", "ERR_CONNECTION_REFUSED"):
            hub.kill()  # SIGKILL: nothing is closed cleanly
            await hub.wait()
            await expect(badge).to_have_text("reconnecting", timeout=5000)
            hub = await _serve(env, port)  # same port, same database: the session still stands
            await expect(badge).to_have_text("live", timeout=15_000)
        # Current data, without a reload: the agent found its way back too, and the page shows it.
        await expect(status).to_have_text("online", timeout=20_000)
        await admin.screenshot("after-restart")
    finally:
        for proc in (agent, hub):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _serve(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    """Start `agenthub serve` in its own process; return once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "serve", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(300):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the hub did not listen on {port}")


async def test_a_thousand_agents_and_fifty_updates_a_second_keep_tables_bounded_and_right(
    hub: RunningHub, operator_at: OpenOperator
) -> None:
    await add_users(hub)
    now = time.time()
    for n in range(1000):  # the last hundred are offline: the snapshot must still show them first
        status = "offline" if n >= 900 else "online"
        fields = {"status": status, "status_reason": "connected", "status_changed_at": now, "last_seen": now}
        await hub.store.save_agent(f"fleet-{n:04d}", fields)
    admin = await signed_in(operator_at, hub.url, "ada")
    page = admin.page
    await expect(page.locator("#agents-online")).to_have_text("900")
    await expect(page.locator("#agents-offline")).to_have_text("100")
    agent_rows = page.locator("#agents tr[data-agent-id]")
    await expect(agent_rows.first.locator(".status")).to_have_text("offline")
    best = 0.0
    for tick in range(150):  # 3 s at 50 updates a second
        risk = (tick * 37) % 97 + 1.5
        best = max(best, risk)
        hub.app[BUS].publish("score", f"fleet:{tick}", _score(f"fleet-{tick % 1000:04d}", tick, risk))
        if tick % 10 == 0:
            await page.wait_for_timeout(200)
    top = page.locator("#top-processes tr[data-process-key]")
    await expect(top.first.locator(".score")).to_contain_text(f"{best:.1f}", timeout=LIVE_WITHIN_MS)
    assert await top.count() <= 25
    assert await agent_rows.count() <= 200
    leader = await top.first.get_attribute("data-process-key")
    exited = next(t for t in range(150) if (t * 37) % 97 + 1.5 == best)
    hub.app[BUS].publish(
        "score", "fleet:exit", {**_score(f"fleet-{exited % 1000:04d}", exited, best), "exited": True}
    )
    await expect(page.locator(f'#top-processes tr[data-process-key="{leader}"]')).to_have_count(0)
    await admin.screenshot("overview-fleet")


async def test_a_page_that_fell_behind_reads_again_after_its_fresh_snapshot(
    hub: RunningHub, operator_at: OpenOperator
) -> None:
    await add_users(hub)
    operator = await signed_in(operator_at, hub.url, "otto")
    await operator.open("/alerts")
    await expect(operator.page.locator("#conn")).to_have_text("live")
    # Stored but never pushed, as when the hub drops a slow page's backlog: the page sees it
    # only by reading again when the hub re-sends it a snapshot.
    alert = {"agent_id": "agent-9", "pid": 9, "process_id": "agent-9:9", "process_key": "agent-9:9:1.000000",
             "severity": "HIGH", "rule_id": "shadow-read", "title": "Password hash file read (/bin/cat)",
             "mitre": ["T1003.008"], "ts": time.time(), "threshold": None, "risk_score": 40.0,
             "explanation": [], "status": "open"}  # fmt: skip
    await hub.store.insert_alerts([alert])
    await operator.page.wait_for_timeout(300)
    assert await operator.page.locator("[data-alert-id]").count() == 0
    hub.app[BUS].resync_all()
    await expect(operator.page.locator("[data-alert-id]")).to_contain_text("T1003.008")


def _score(agent_id: str, pid: int, risk: float) -> dict[str, Any]:
    return {
        "process_key": f"{agent_id}:{pid}:1",
        "process_id": f"{agent_id}:{pid}",
        "agent_id": agent_id,
        "pid": pid,
        "exe": "/usr/bin/work",
        "risk_score": risk,
        "explanation": [],
        "exited": False,
        "updated_ts": time.time(),
    }
