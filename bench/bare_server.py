"""The baseline: python-socketio on aiohttp as a user would start it, counting and acking."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgpack
import socketio
import uvloop
from aiohttp import web

from hub.identity import server_ssl_context


def build() -> web.Application:
    sio = socketio.AsyncServer(async_mode="aiohttp")  # library defaults, on purpose
    app = web.Application()
    sio.attach(app)
    counted = {"events": 0}

    @sio.on("connect", namespace="/agent")
    async def connect(sid: str, environ: dict[str, object], auth: object = None) -> None:
        await sio.emit(
            "hello",
            {"last_seq": 0, "max_batch": 1000, "heartbeat_interval_s": 10.0},
            to=sid,
            namespace="/agent",
        )

    @sio.on("events", namespace="/agent")
    async def events(sid: str, payload: dict[str, list[object]] | bytes) -> dict[str, int]:
        if isinstance(payload, bytes):
            payload = msgpack.unpackb(payload)
        batch = payload["events"]
        counted["events"] += len(batch)
        return {"accepted": len(batch), "duplicates": 0, "last_seq": 0}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare python-socketio baseline server.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certs-dir", type=Path, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the hub does")
    args = parser.parse_args()
    web.run_app(
        build(),
        host="127.0.0.1",
        port=args.port,
        ssl_context=server_ssl_context(args.certs_dir),
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop() if args.uvloop else None,
    )


if __name__ == "__main__":
    main()
