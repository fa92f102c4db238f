"""`agenthub-agent`: run the agent from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from agent_client import __version__
from agent_client.collectors import HostCollector
from agent_client.replay import ReplayError, count_events, replay
from agent_client.session import ENGINEIO_LOG, SOCKETIO_LOG, AgentSession
from agent_client.spool import DEFAULT_MAX_EVENTS, Spool
from agent_client.tls import CertificateError, check_validity
from agent_client.wire import Event, HubRefusalError

log = logging.getLogger("agent_client.cli")

EXIT_ERROR = 2
_USER_ERRORS = (CertificateError, ReplayError, HubRefusalError, sqlite3.Error, OSError, ValueError)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `agenthub-agent` with `argv` (default: the process arguments); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_ERROR
    _configure_logging(args.debug)
    try:
        return int(args.handler(args))
    except _USER_ERRORS as exc:
        if args.debug:
            log.exception("agenthub-agent failed")
        print(f"agenthub-agent: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agenthub-agent", description="Agent Hub agent: stream host events to a hub.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(command=None, debug=False)
    commands = parser.add_subparsers(title="commands", dest="command", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="connect to a hub and stream events",
        description="Collect host events (or replay a file), spool them to disk and stream them "
        "to the hub over mutual TLS. Stops cleanly on SIGINT/SIGTERM.",
    )
    _add_run_arguments(run)
    run.set_defaults(handler=_run)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    hub = run.add_argument_group("hub and identity")
    hub.add_argument("--hub", required=True, metavar="URL", help="hub base URL, e.g. https://hub:8443")
    hub.add_argument("--cert", required=True, metavar="FILE", help="this agent's certificate (PEM)")
    hub.add_argument("--key", required=True, metavar="FILE", help="the certificate's private key (PEM)")
    hub.add_argument("--ca", required=True, metavar="FILE", help="CA bundle that signed the hub (PEM)")
    hub.add_argument("--hostname", metavar="NAME", help="hostname to report (default: this host's)")
    events = run.add_argument_group("events")
    events.add_argument(
        "--spool",
        default="./agent-spool.db",
        metavar="PATH",
        help="spool file (default: %(default)s)",
    )
    events.add_argument(
        "--spool-max",
        type=_positive(int),
        default=DEFAULT_MAX_EVENTS,
        metavar="N",
        help="most events kept; the oldest are dropped beyond it (default: %(default)s)",
    )
    events.add_argument(
        "--replay",
        metavar="FILE.jsonl",
        help="send the events of a JSONL file instead of collecting",
    )
    events.add_argument("--replay-rate", type=_positive(float), metavar="N", help="replay at most N events/s")
    events.add_argument(
        "--exit-when-drained",
        action="store_true",
        help="with --replay: exit 0 once the hub has stored every event",
    )
    events.add_argument(
        "--poll-interval",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="seconds between host scans (default: %(default)s)",
    )
    wire = run.add_argument_group("wire")
    wire.add_argument(
        "--encoding",
        choices=("json", "msgpack"),
        default="json",
        help="batch encoding (default: json)",
    )
    wire.add_argument(
        "--inflight",
        type=_positive(int),
        default=4,
        metavar="N",
        help="batches awaiting an ack at once (default: 4)",
    )
    run.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")


def _run(args: argparse.Namespace) -> int:
    _check_run_arguments(args)
    check_validity(args.cert)
    if args.replay:
        log.info("replaying %d events from %s", count_events(args.replay), args.replay)
    spool = Spool(args.spool, max_events=args.spool_max)
    try:
        return _run_async(_serve(args, spool))
    finally:
        spool.close()


def _check_run_arguments(args: argparse.Namespace) -> None:
    if urlsplit(args.hub).scheme not in ("https", "http"):
        raise ValueError(f"--hub must be an https:// URL (http:// for a development hub), not {args.hub!r}")
    if args.exit_when_drained and not args.replay:
        raise ValueError("--exit-when-drained needs --replay (collecting never ends)")
    if args.replay_rate and not args.replay:
        raise ValueError("--replay-rate needs --replay")


async def _serve(args: argparse.Namespace, spool: Spool) -> int:
    session = AgentSession(
        args.hub,
        args.cert,
        args.key,
        args.ca,
        spool,
        encoding=args.encoding,
        inflight=args.inflight,
        hostname=args.hostname,
    )
    source = _source(args)
    stopping: set[asyncio.Task[None]] = set()
    _on_signals(lambda: stopping.add(asyncio.create_task(session.stop())))
    running = asyncio.create_task(session.run(source))
    if args.exit_when_drained:
        drained = asyncio.create_task(session.wait_drained())
        await asyncio.wait({running, drained}, return_when=asyncio.FIRST_COMPLETED)
        if drained.done():
            log.info("every event is stored by the hub; exiting")
            await session.stop()
        drained.cancel()
    await running
    return 0


def _source(args: argparse.Namespace) -> AsyncIterator[Event]:
    if args.replay:
        return replay(args.replay, rate=args.replay_rate)
    return HostCollector(interval=args.poll_interval).stream()


def _on_signals(callback: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, callback)


def _run_async(coro: Any) -> int:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro))


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if debug:
        SOCKETIO_LOG.setLevel(logging.DEBUG)
        ENGINEIO_LOG.setLevel(logging.DEBUG)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HubRefusalError):
        return f"the hub refused this agent ({exc.code}): {exc.message}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
