"""Fixtures that start the real hub (TLS, SQLite, Socket.IO) on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import asyncpg
import pytest
import socketio
from aiohttp import web

from hub.app import create_app
from hub.certs import create_ca, init_pki, issue_agent
from hub.config import Settings
from hub.keys import INGESTOR, SCORING, STORE
from hub.store import Store, create_store
from hub.store.sql import migrations
from hub.tokens import create_token

# The machine's PostgreSQL; each test gets a schema of its own there.
POSTGRES_URL = os.environ.get("HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# `HUB_TEST_STORE=postgresql make test` runs every hub the tests start on PostgreSQL.
STORE_BACKEND = os.environ.get("HUB_TEST_STORE", "sqlite")


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """Skip a test under `HUB_TEST_STORE=postgresql`: it is about SQLite's own file or locks."""
    return pytest.mark.skipif(STORE_BACKEND != "sqlite", reason=f"SQLite only: {reason}")


def free_port() -> int:
    """Return a loopback TCP port nobody listens on now (for a hub that restarts on the same port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_tool(name: str) -> str:
    """Return the path of a program a test needs: skip without it here, fail without it in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but is not installed; .ci/run should install it")
        pytest.skip(f"{name} is not installed on this machine")
    return path


def require_service(name: str, error: BaseException) -> NoReturn:
    """Skip a test whose service is down here, fail it in CI (.ci/run starts the services)."""
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI but does not answer: {error}")
    pytest.skip(f"{name} does not answer on this machine: {error}")


def run_sql(statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            # A hub still connected to a schema being dropped (a fixture torn down in the wrong
            # order) then fails the test rather than hanging it.
            await conn.execute("SET lock_timeout = '20s'")
            await conn.execute(statement)
        finally:
            await conn.close()

    # In a thread of its own: the test's event loop may be running in this one.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, run()).result()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A `database_url` for a fresh PostgreSQL schema of this test's own, dropped afterwards."""
    schema = "agenthub_test_" + secrets.token_hex(6)
    try:
        run_sql(f'CREATE SCHEMA "{schema}"')
    except (OSError, asyncpg.PostgresError) as exc:
        require_service("PostgreSQL", exc)
    yield f"{POSTGRES_URL}?search_path={schema}"
    run_sql(f'DROP SCHEMA "{schema}" CASCADE')


def hub_env(settings: Settings) -> dict[str, str]:
    """The `HUB_` variables that point a CLI or a hub process at the database of `settings`."""
    env = {"HUB_DATA_DIR": str(settings.data_dir)}
    if settings.database_url is not None:
        env["HUB_DATABASE_URL"] = settings.database_url.get_secret_value()
    return env


async def stored_bytes(settings: Settings) -> bytes:
    """Everything the hub's database holds, as bytes: to check a secret is kept nowhere it must not be."""
    if settings.database_url is None:
        return b"".join(path.read_bytes() for path in sorted(settings.data_dir.glob("hub.db*")))
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=5)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        select = 'SELECT * FROM "{}"'  # table names from the catalog, not from input
        rows = [row for table in tables for row in await conn.fetch(select.format(table[0]))]
    finally:
        await conn.close()
    values = [value for row in rows for value in row.values()]
    return b"\n".join(value if isinstance(value, bytes) else str(value).encode() for value in values)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate and a few agent certificates, made once per run."""
    certs = tmp_path_factory.mktemp("certs")
    init_pki(certs, ["localhost", "127.0.0.1"])
    for agent_id in ("agent-1", "agent-2", "agent-3"):
        issue_agent(certs, agent_id)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    issue_agent(certs, "expired-agent", days=1, not_before=past)
    return certs


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with an agent certificate the hub must not trust."""
    certs = tmp_path_factory.mktemp("other-ca")
    create_ca(certs, common_name="Someone Else's CA")
    issue_agent(certs, "agent-1")
    return certs


@pytest.fixture
def settings(tmp_path: Path, pki: Path, request: pytest.FixtureRequest) -> Settings:
    # Each hub gets its own copy of the PKI: a test may rotate the CA (the API allows it).
    certs = tmp_path / "certs"
    shutil.copytree(pki, certs)
    database_url = request.getfixturevalue("postgres_url") if STORE_BACKEND == "postgresql" else None
    return Settings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path / "data",
        certs_dir=certs,
        jwt_secret="test-secret-" + "x" * 40,
        heartbeat_interval_s=30.0,
        database_url=database_url,
    )


@dataclass
class RunningHub:
    app: web.Application
    url: str
    settings: Settings
    certs: Path

    @property
    def store(self) -> Any:
        return self.app[STORE]

    async def settle(self) -> None:
        """Wait until everything stored has been scored and persisted."""
        for _ in range(500):
            if self.app[INGESTOR].in_flight == 0:
                break
            await asyncio.sleep(0.01)
        await self.app[SCORING].drain()

    def token(self, *scopes: str) -> str:
        return create_token(self.settings, scopes=list(scopes or ["hub:read"]), subject="tester")


async def start_hub(settings: Settings) -> tuple[web.AppRunner, RunningHub]:
    from hub.app import listener_ssl

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    context = listener_ssl(app)
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if context is not None else "http"
    return runner, RunningHub(app, f"{scheme}://127.0.0.1:{port}", settings, settings.certs_dir)


HubStarter = Callable[[dict[str, Any]], Awaitable[RunningHub]]


def sqlite_database_at(settings: Settings, version: int) -> sqlite3.Connection:
    """A SQLite database migrated up to `version` only, as an older hub left it, for an upgrade to meet."""
    settings.data_dir.mkdir(parents=True)
    conn = sqlite3.connect(settings.db_path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for number, script in migrations("sqlite"):
        if number <= version:
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (number,))
    return conn


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings naming a database of this test's own, on each backend: a SQLite file, a PostgreSQL schema."""
    database_url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return Settings(data_dir=tmp_path / "data", database_url=database_url)


@pytest.fixture
async def store(store_settings: Settings) -> AsyncIterator[Store]:
    """A real store of its own (no hub around it), on each backend."""
    opened = create_store(store_settings)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def hub_with(settings: Settings) -> AsyncIterator[HubStarter]:
    """Start real hubs with some settings changed: `await hub_with({"max_batch_events": 10})`."""
    runners: list[web.AppRunner] = []

    async def start(overrides: dict[str, Any]) -> RunningHub:
        runner, running = await start_hub(settings.model_copy(update=overrides))
        runners.append(runner)
        return running

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[RunningHub]:
    runner, running = await start_hub(settings)
    yield running
    await runner.cleanup()


def client_ssl(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@dataclass
class AgentConn:
    """A stock python-socketio client connected to `/agent`, and what the hub sent it."""

    sio: socketio.AsyncClient
    session: aiohttp.ClientSession
    hello: asyncio.Future[dict[str, Any]]
    received: list[tuple[str, Any]]

    async def send(self, payload: Any, event: str = "events") -> Any:
        return await self.sio.call(event, payload, namespace="/agent", timeout=30)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()
        await self.session.close()


ConnectAgent = Callable[..., Awaitable[AgentConn]]


async def open_agent(
    hub: RunningHub,
    agent_id: str | None = "agent-1",
    *,
    certs: Path | None = None,
    auth: dict[str, Any] | None = None,
    handlers: dict[str, Callable[..., Awaitable[Any]]] | None = None,
    transports: Sequence[str] = ("websocket",),
) -> AgentConn:
    """Connect a real agent to `hub` with the client certificate of `agent_id`; wait for hello.

    `handlers` answer hub events (such as `command`) from the first moment: events may follow hello at once.
    `transports`: the client's default, ("polling", "websocket"), starts with long-polling and upgrades.
    """
    folder = certs or hub.certs
    cert = folder / f"{agent_id}.pem" if agent_id else None
    key = folder / f"{agent_id}.key" if agent_id else None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem", cert, key))
    )
    sio = socketio.AsyncClient(http_session=session, reconnection=False)
    hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    received: list[tuple[str, Any]] = []

    async def on_hello(data: dict[str, Any]) -> None:
        received.append(("hello", data))
        if not hello.done():
            hello.set_result(data)

    sio.on("hello", on_hello, namespace="/agent")
    for event, handler in (handlers or {}).items():
        sio.on(event, handler, namespace="/agent")
    conn = AgentConn(sio, session, hello, received)
    try:
        await sio.connect(
            hub.url, namespaces=["/agent"], transports=list(transports), auth=auth or {}, wait_timeout=10
        )
        await asyncio.wait_for(hello, 10)
    except BaseException:
        await conn.close()
        raise
    return conn


async def try_connect(hub: RunningHub, cert: Path | None, key: Path | None) -> dict[str, Any] | None:
    """Try to connect; return the connect_error data, or raise if TLS itself failed."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl(hub.certs / "ca.pem", cert, key))
    )
    sio = socketio.AsyncClient(http_session=session, reconnection=False)
    refusal: dict[str, Any] = {}
    # A hub refusal arrives as a dict; a transport failure as the string "Connection error".
    sio.on(
        "connect_error",
        lambda data: refusal.update(data if isinstance(data, dict) else {}),
        namespace="/agent",
    )
    try:
        await sio.connect(hub.url, namespaces=["/agent"], transports=["websocket"], wait_timeout=5)
    except socketio.exceptions.ConnectionError:
        if not refusal:  # no connect_error packet: the TLS handshake failed
            raise
    finally:
        await sio.disconnect()
        await session.close()
    return refusal or None


@pytest.fixture
async def connect_agent(hub: RunningHub) -> AsyncIterator[ConnectAgent]:
    """Connect real agents with client certificates: `await connect_agent("agent-1")`."""
    opened: list[AgentConn] = []

    async def connect(agent_id: str | None = "agent-1", **options: Any) -> AgentConn:
        conn = await open_agent(hub, agent_id, **options)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        await conn.close()


@pytest.fixture
async def http(hub: RunningHub) -> AsyncIterator[aiohttp.ClientSession]:
    """An operator's HTTP client trusting the hub CA, without a client certificate."""
    context = client_ssl(hub.certs / "ca.pem")
    async with aiohttp.ClientSession(
        base_url=hub.url, connector=aiohttp.TCPConnector(ssl=context)
    ) as session:
        yield session


def bearer(hub: RunningHub, *scopes: str) -> dict[str, str]:
    """The Authorization header of a token with `scopes` (hub:read by default)."""
    return {"Authorization": f"Bearer {hub.token(*scopes)}"}


async def call(
    http: aiohttp.ClientSession,
    hub: RunningHub,
    method: str,
    path: str,
    body: Any = None,
    *,
    scope: str = "hub:admin",
) -> tuple[int, Any]:
    """Make an API call with a token of `scope`; return the status and the JSON answer (None for 204)."""
    headers = {"Authorization": f"Bearer {hub.token(scope)}"}
    async with http.request(method, path, json=body, headers=headers) as response:
        return response.status, None if response.status == 204 else await response.json(content_type=None)


def make_events(start: int, count: int, *, pid: int = 1000, kind: str = "file_open") -> list[dict[str, Any]]:
    return [
        {
            "seq": seq,
            "ts": 1_700_000_000.0 + seq / 1000,
            "kind": kind,
            "pid": pid,
            "path": f"/tmp/f{seq}",
        }
        for seq in range(start, start + count)
    ]
