"""`agenthub`: serve, certs, token, users, audit, recalculate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from hub import __version__
from hub.certs import CertificateError, init_pki, issue_agent
from hub.config import Settings
from hub.problems import HubError
from hub.rules import RuleError
from hub.sessions import ROLES

if TYPE_CHECKING:
    from hub.audit import Action
    from hub.store import Store
    from hub.users import Users

log = logging.getLogger("agenthub")
T = TypeVar("T")
DEMO_AGENT = "demo-agent"


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: value
        for name in ("host", "port", "data_dir", "certs_dir")
        if (value := getattr(args, name, None)) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise CliError(f"bad setting {field} (HUB_{field.upper()}): {first['msg']}") from None
    if not args.debug:
        logging.getLogger().setLevel(settings.log_level)
    return settings


def _run_async(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, T]], T] = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(main)


async def _serve_until_signal(settings: Settings) -> None:
    from hub.app import serve

    # SIGTERM (systemd's stop) or SIGINT starts the drain, bounded by drain_timeout_s; a repeat
    # changes nothing. Cancelling instead would leave aiohttp's cleanup running in a cancelled
    # task, where its waits end early and the store may stay open.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop=stop)
    log.info("agent hub stopped")


def cmd_serve(args: argparse.Namespace) -> None:
    from hub.observability import configure_logging

    settings = _settings(args)
    level = logging.DEBUG if args.debug else settings.log_level
    configure_logging(args.log_format or settings.log_format, level)
    _run_async(_serve_until_signal(settings))


def cmd_certs_init(args: argparse.Namespace) -> None:
    created = init_pki(args.dir, args.hostname or ["localhost", "127.0.0.1", "::1"])
    state = "created" if created else "already present"
    print(f"CA and server certificate {state} in {args.dir}")


def cmd_certs_issue(args: argparse.Namespace) -> None:
    from hub.audit import AuditLog, cli_action
    from hub.certs import fingerprint, new_agent_certificate, save_agent_files, serial_hex
    from hub.identity import certificate_record

    cert, key = new_agent_certificate(args.dir, args.agent_id, days=args.days)
    target = {"agent_id": args.agent_id, "serial": serial_hex(cert), "fingerprint": fingerprint(cert)}

    async def record() -> None:
        async with _open_store(_settings(args)) as store:
            await store.save_certificate(certificate_record(cert, source="issued", now=time.time()))
            await AuditLog(store).append(cli_action("issue_certificate", "agenthub certs issue", target))

    # Recorded before the files are written: a certificate the hub does not know is never handed
    # out, so any can be listed and revoked by fingerprint even if its agent never connects.
    _run_async(record())
    files = save_agent_files(args.dir, cert, key)
    print(f"issued {files.cert} and {files.key}")


def cmd_token_create(args: argparse.Namespace) -> None:
    import json

    from hub.audit import cli_action
    from hub.tokens import issue_token

    settings = _settings(args)
    try:
        issued = issue_token(settings, scopes=args.scope, subject=args.subject, ttl_s=args.ttl)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.expires_at))
    target = {"jti": issued.jti, "subject": issued.subject, "scope": issued.scope, "expires_at": expires}
    # Recorded before the token is shown: a token the log does not know is never handed out.
    _audit(settings, cli_action("create_token", "agenthub token create", target))
    if args.json:
        print(json.dumps({"token": issued.token, **target}))
        return
    print(issued.token)
    print(f"token id (jti) {issued.jti}, expires {expires}; revoke: agenthub token revoke {issued.jti}",
          file=sys.stderr)  # fmt: skip


def cmd_token_revoke(args: argparse.Namespace) -> None:
    import re

    from hub.audit import AuditLog, cli_action
    from hub.tokens import JTI_PATTERN, RevokedTokens

    if not re.fullmatch(JTI_PATTERN, args.jti):
        raise CliError(f"invalid token id {args.jti!r}: expected the jti `agenthub token create` printed")
    settings = _settings(args)

    async def run() -> dict[str, Any]:
        async with _open_store(settings, must_exist=True) as store:
            record = await RevokedTokens(store, ttl_s=0).revoke(args.jti, reason=args.reason)
            await AuditLog(store).append(
                cli_action("revoke_token", "agenthub token revoke", {"jti": args.jti})
            )
            return record

    record = _run_async(run())
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["revoked_at"]))
    print(f"token {args.jti} revoked at {when}; a running hub refuses it within seconds")


def _read_password(prompt: str) -> str:
    """Ask for a new password twice on a terminal; otherwise read one line from standard input."""
    import getpass

    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("no password on standard input")
        return password
    password = getpass.getpass(prompt)
    if getpass.getpass("Repeat it: ") != password:
        raise CliError("the two passwords differ")
    return password


def _users_action(args: argparse.Namespace, action: str, change: Callable[[Users], Awaitable[Any]]) -> None:
    """Run `change` on the hub's accounts and record it in the audit log under `action`."""
    from hub.audit import AuditLog, cli_action
    from hub.users import Users

    settings = _settings(args)

    async def run() -> None:
        async with _open_store(settings) as store:
            try:
                await change(Users(settings, store))
            except (ValueError, LookupError) as exc:
                raise CliError(str(exc)) from None
            command = f"agenthub users {args.users_command}"
            await AuditLog(store).append(cli_action(action, command, {"user": args.name}))

    _run_async(run())


def cmd_users_add(args: argparse.Namespace) -> None:
    from hub.users import check_role, check_user_name

    try:  # before asking for a password that would be thrown away
        check_user_name(args.name)
        check_role(args.role)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    password = _read_password(f"Password for {args.name}: ")
    _users_action(args, "add_user", lambda users: users.add(args.name, role=args.role, password=password))
    print(f"user {args.name} added with role {args.role}")


def cmd_users_passwd(args: argparse.Namespace) -> None:
    password = _read_password(f"New password for {args.name}: ")
    _users_action(args, "set_user_password", lambda users: users.set_password(args.name, password))
    print(f"password of {args.name} changed; their sessions have ended")


def cmd_users_role(args: argparse.Namespace) -> None:
    _users_action(args, "set_user_role", lambda users: users.set_role(args.name, args.role))
    print(f"{args.name} is now {args.role}")


def cmd_users_unlock(args: argparse.Namespace) -> None:
    _users_action(args, "unlock_user", lambda users: users.unlock(args.name))
    print(f"{args.name} may sign in again")


def cmd_users_remove(args: argparse.Namespace) -> None:
    _users_action(args, "remove_user", lambda users: users.remove(args.name))
    print(f"user {args.name} removed; their sessions have ended")


def cmd_users_list(args: argparse.Namespace) -> None:
    from hub.users import Users

    settings = _settings(args)

    async def run() -> list[dict[str, Any]]:
        async with _open_store(settings, must_exist=True) as store:
            return await Users(settings, store).list()

    rows = _run_async(run())
    if not rows:
        print("no users yet: agenthub users add NAME --role viewer|operator|admin")
        return
    now = time.time()
    print(f"{'NAME':<24} {'ROLE':<9} {'LAST SIGN-IN':<20} STATE")
    for row in rows:
        last = row["last_signin_at"]
        shown = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(last)) if last else "never"
        state = f"locked {math.ceil(row['locked_until'] - now)} s" if row["locked_until"] > now else "ok"
        print(f"{row['name']:<24} {row['role']:<9} {shown:<20} {state}")


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from hub.audit import AuditLog, ChainReport

    settings = _settings(args)
    shown = False

    def progress(count: int) -> None:
        nonlocal shown
        shown = True
        print(f"\rverified {count} entries", end="", file=sys.stderr, flush=True)

    async def run() -> ChainReport:
        async with _open_store(settings, must_exist=True) as store:
            return await AuditLog(store).verify(progress=progress)

    report = _run_async(run())
    if shown:
        print(file=sys.stderr)  # end the progress line
    if report.broken is None:
        print(f"audit log intact: {report.count} entries, head hash {report.head}")
        return
    print(f"audit log BROKEN at entry {report.broken.entry_id}: {report.broken.reason} "
          f"({report.count} entries before it verified)")  # fmt: skip
    sys.exit(1)


@contextlib.asynccontextmanager
async def _open_store(settings: Settings, *, must_exist: bool = False) -> AsyncIterator[Store]:
    """Open the hub's database beside a running hub (SQLite WAL or PostgreSQL let both write)."""
    from hub.store import create_store

    if must_exist and settings.database_url is None and not settings.db_path.is_file():
        # A wrong folder must not pass for an empty log, or take a revocation the hub never sees.
        raise CliError(f"no hub database at {settings.db_path}: check --data-dir or HUB_DATA_DIR")
    store = create_store(settings)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _audit(settings: Settings, action: Action) -> None:
    """Append a CLI operator action to the hub's audit log."""
    from hub.audit import AuditLog

    async def run() -> None:
        async with _open_store(settings) as store:
            await AuditLog(store).append(action)

    _run_async(run())


def cmd_recalculate(args: argparse.Namespace) -> None:
    from hub.rules import load_rules
    from hub.scoring import RiskEngine, RiskParams, recalculate

    settings = _settings(args)

    async def run() -> None:
        async with _open_store(settings) as store:
            count = await recalculate(
                store,
                RiskEngine(load_rules(settings.rule_files), RiskParams.from_settings(settings)),
                progress=lambda n: print(f"\rreplayed {n} events", end="", file=sys.stderr, flush=True),
            )
        print(f"\nrecalculated scores from {count} stored events")

    _run_async(run())


def cmd_demo(args: argparse.Namespace) -> None:
    """Start a hub and one demo agent streaming this machine's activity."""
    settings = _settings(args)
    certs, data = settings.certs_dir, settings.data_dir
    if init_pki(certs, ["localhost", "127.0.0.1", "::1"]):
        print(f"generated a development CA and server certificate in {certs}/")
    if not (certs / f"{DEMO_AGENT}.pem").is_file():
        issue_agent(certs, DEMO_AGENT)
        print(f"issued the demo agent certificate {certs}/{DEMO_AGENT}.pem")
    password = _demo_admin_password(settings)
    env = {**os.environ, "HUB_DATA_DIR": str(data), "HUB_CERTS_DIR": str(certs)}
    hub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub.cli",
            "serve",
            "--port",
            str(settings.port),
            "--host",
            settings.host,
            "--log-format",  # a person reads these lines
            "text",
        ],
        env=env,
    )
    url = f"https://{settings.host}:{settings.port}"
    agent: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_port(settings.host, settings.port, hub)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent_client.cli",
                "run",
                "--hub",
                url,
                "--cert",
                str(certs / f"{DEMO_AGENT}.pem"),
                "--key",
                str(certs / f"{DEMO_AGENT}.key"),
                "--ca",
                str(certs / "ca.pem"),
                "--spool",
                str(data / f"{DEMO_AGENT}-spool.db"),
            ]
        )
        sign_in = f"user admin, password {password}" if password else "your own account (agenthub users add)"
        print(
            f"\n  Dashboard: {url}/  (sign in: {sign_in})\n  The browser will warn about the development"
            f" CA; trust {certs}/ca.pem to silence it.\n  Ctrl-C stops the hub and the agent.\n",
            flush=True,
        )
        hub.wait()
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
    finally:
        for proc in (agent, hub):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (agent, hub):
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _demo_admin_password(settings: Settings) -> str | None:
    """Make the demo's `admin` account on first run; return its password, kept in the data dir (0600)."""
    import secrets

    from hub.users import Users

    path = settings.data_dir / "demo-admin.password"
    if path.is_file():
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)

    async def add() -> bool:
        async with _open_store(settings) as store:
            try:
                await Users(settings, store).add("admin", role="admin", password=password)
            except ValueError:  # someone made an `admin` of their own: theirs stands
                return False
            return True

    if not _run_async(add()):
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"the hub exited with code {proc.returncode}; see its messages above")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise CliError(f"the hub did not start listening on {host}:{port} within 30 s")


def _state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="hub state folder (HUB_DATA_DIR, default ./data)")
    parser.add_argument("--certs-dir", type=Path, help="CA and certificates (HUB_CERTS_DIR, default ./certs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agenthub", description="Agent Hub: real-time hub for security agents."
    )
    parser.add_argument("--version", action="version", version=f"agenthub {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the hub", description="Run the hub (TLS, agents, API, pages)."
    )
    serve.add_argument("--host", help="listen address (HUB_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (HUB_PORT, default 8443)")
    serve.add_argument(
        "--log-format", choices=("json", "text"), help="log lines on stderr (HUB_LOG_FORMAT, default json)"
    )
    _state_options(serve)
    serve.set_defaults(func=cmd_serve)

    certs = commands.add_parser("certs", help="manage the CA and certificates", description="Manage the CA.")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    init = certs_commands.add_parser(
        "init",
        help="create the CA and the server certificate",
        description="Write ca.pem, ca.key, server.pem, server.key (keys 0600).",
    )
    init.add_argument("--dir", type=Path, default=Path(os.environ.get("HUB_CERTS_DIR", "certs")))
    init.add_argument("--hostname", action="append", help="server name or IP (repeatable)")
    init.set_defaults(func=cmd_certs_init)
    issue = certs_commands.add_parser(
        "issue",
        help="issue an agent certificate",
        description="Write AGENT_ID.pem and AGENT_ID.key signed by the CA.",
    )
    issue.add_argument("agent_id", metavar="AGENT_ID")
    issue.add_argument("--dir", type=Path, default=Path(os.environ.get("HUB_CERTS_DIR", "certs")))
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.add_argument(
        "--data-dir", type=Path, help="hub state folder: the certificate and the audit log (HUB_DATA_DIR)"
    )
    issue.set_defaults(func=cmd_certs_issue)

    token = commands.add_parser("token", help="operator tokens", description="Operator tokens.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser(
        "create",
        help="print a signed operator token",
        description="Print an operator JWT signed with the hub's secret.",
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="hub:read, hub:write or hub:admin (repeatable)",
    )
    create.add_argument("--ttl", type=int, help="lifetime in seconds (default 3600)")
    create.add_argument("--subject", default="operator", help="who the token is for")
    create.add_argument(
        "--json", action="store_true", help="print the token with its jti, subject, scope and expiry as JSON"
    )
    _state_options(create)
    create.set_defaults(func=cmd_token_create)
    revoke = token_commands.add_parser(
        "revoke",
        help="revoke an operator token by its id (jti)",
        description="Refuse the token with this jti from now on (a running hub sees it within seconds).",
    )
    revoke.add_argument("jti", metavar="JTI", help="the token id `agenthub token create` printed")
    revoke.add_argument("--reason", default="", help="why, kept with the revocation")
    _state_options(revoke)
    revoke.set_defaults(func=cmd_token_revoke)

    _users_parser(commands)

    audit = commands.add_parser("audit", help="the operator audit log", description="The operator audit log.")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser(
        "verify",
        help="check the audit log's hash chain",
        description="Walk the hash chain; exit 0 when intact, 1 naming the first broken entry.",
    )
    _state_options(verify)
    verify.set_defaults(func=cmd_audit_verify)

    recalc = commands.add_parser(
        "recalculate",
        help="replay stored events through the current rules",
        description="Recompute every score from the stored events (hub stopped).",
    )
    _state_options(recalc)
    recalc.set_defaults(func=cmd_recalculate)

    demo = commands.add_parser(
        "demo",
        help="run a hub and a demo agent (make run)",
        description="Generate dev certificates if absent, start the hub and one demo agent.",
    )
    demo.add_argument("--host", help="listen address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="listen port (default 8443)")
    _state_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def _users_parser(commands: Any) -> None:
    users = commands.add_parser(
        "users",
        help="operator accounts for the web pages",
        description="Operator accounts: each signs in to the pages with a name and password, "
        "and its role grants API scopes (viewer: hub:read, operator: hub:write, admin: hub:admin).",
    )
    users_commands = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    asked = "The password is asked twice on a terminal, or read as one line from standard input."
    specs: list[tuple[str, str, Callable[[argparse.Namespace], None]]] = [
        ("add", f"Add an account with a role. {asked}", cmd_users_add),
        ("passwd", f"Set an account's password; its sessions end. {asked}", cmd_users_passwd),
        ("role", "Give an account another role; its sessions take it at once.", cmd_users_role),
        ("unlock", "Clear an account's failed sign-ins and lockout.", cmd_users_unlock),
        ("remove", "Delete an account; its sessions end.", cmd_users_remove),
        ("list", "List the accounts with role, last sign-in and lockout.", cmd_users_list),
    ]
    for name, description, func in specs:
        sub = users_commands.add_parser(name, help=description.split(".")[0].lower(), description=description)
        if name != "list":
            sub.add_argument("name", metavar="NAME", help="the account's user name")
        if name == "add":
            sub.add_argument("--role", required=True, choices=ROLES, help="viewer, operator or admin")
        if name == "role":
            sub.add_argument("role", metavar="ROLE", choices=ROLES, help="viewer, operator or admin")
        _state_options(sub)
        sub.set_defaults(func=func)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (CliError, CertificateError, RuleError, HubError, OSError) as exc:
        if args.debug:
            raise
        print(f"agenthub: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
