"""What every benchmark shares: servers in their own pinned process, percentiles, the printed table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECRET = "bench-secret-" + "z" * 40
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
# Headless Chromium kept off the network: it talks to the hub under test only.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def add_before_argument(parser: argparse.ArgumentParser) -> None:
    """`--before TREE`: also measure the hub of an earlier checkout, side by side in the same run."""
    parser.add_argument(
        "--before",
        type=_checkout,
        metavar="TREE",
        help="also run the hub of this checkout (e.g. `git worktree add /tmp/before REV`)",
    )


def _checkout(value: str) -> Path:
    tree = Path(value)
    if not (tree / "hub" / "cli.py").is_file():  # python would run this tree's hub instead
        raise argparse.ArgumentTypeError(f"{value}: no hub/cli.py there")
    return tree


def pin_load_generator() -> None:
    """Keep this process on core 1: the server under test gets core 0 to itself."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})


def hub_command(port: int) -> list[str]:
    return [sys.executable, "-m", "hub.cli", "serve", "--port", str(port)]


def hub_env(data_dir: Path, certs: Path, **settings: str) -> dict[str, str]:
    """The environment of a benchmarked hub; `settings` are more HUB_* values (without the prefix)."""
    return {
        # A developer's own HUB_* settings must not leak into the run.
        **{key: value for key, value in os.environ.items() if not key.startswith("HUB_")},
        "HUB_JWT_SECRET": SECRET,
        "HUB_DATA_DIR": str(data_dir),
        "HUB_CERTS_DIR": str(certs),
        "HUB_LOG_LEVEL": "WARNING",
        # One load generator on one address: the API's rate limits would measure themselves.
        "HUB_RATE_LIMIT_PER_S": "1e9",
        "HUB_RATE_LIMIT_BURST": "1000000000",
        "HUB_RATE_LIMIT_ADDRESS_PER_S": "1e9",
        "HUB_RATE_LIMIT_ADDRESS_BURST": "1000000000",
        # ... and its 1,000 agents connect at once, from that one address.
        "HUB_MAX_CONNECTING_PER_ADDRESS": "1000000",
        **{f"HUB_{name.upper()}": value for name, value in settings.items()},
    }


def start_server(
    command: list[str], env: dict[str, str], port: int, *, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server pinned to core 0 and wait until it listens on `port`.

    `cwd`: where it runs; `python -m` imports its package from there first.
    """
    pinned = ["taskset", "-c", "0", *command] if shutil.which("taskset") else command
    proc = subprocess.Popen(pinned, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not listen on {port}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))], 2)


def table(rows: list[dict[str, Any]], headers: list[str]) -> str:
    """Render `rows` as a plain-text table with `headers` as its columns."""
    shown = [[str(row[h]) if row[h] is not None else "-" for h in headers] for row in rows]
    widths = [max(len(h), *(len(cells[i]) for cells in shown)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in shown]
    return "\n".join([line, "-" * len(line), *body])


def record_results(figures: dict[str, Any]) -> None:
    """Merge `figures` into `bench/results/latest.json`: each benchmark writes its own keys."""
    known = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(known | figures, indent=2) + "\n")
    print(f"wrote {RESULTS}")
