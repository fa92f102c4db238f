"""The shipped systemd units: valid for systemd, hardened, restart policy sane."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hub.app import SHUTDOWN_GRACE_S
from hub.config import Settings
from tests.conftest import require_tool

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _local_copy(unit: str, folder: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's installed scripts.
    scripts = Path(sys.executable).parent
    text = (UNITS / unit).read_text().replace("/opt/agenthub/.venv/bin/", f"{scripts}/")
    copy = folder / unit
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("unit", ["agenthub.service", "agenthub-agent.service"])
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [require_tool("systemd-analyze"), "verify", str(_local_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert unit not in result.stderr, result.stderr


@pytest.mark.parametrize(("unit", "worst"), [("agenthub.service", 2.0), ("agenthub-agent.service", 3.0)])
def test_unit_exposure_stays_low(unit: str, worst: float, tmp_path: Path) -> None:
    result = subprocess.run(
        [require_tool("systemd-analyze"), "security", "--offline=true", str(_local_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= worst


@pytest.mark.parametrize("unit", ["agenthub.service", "agenthub-agent.service"])
def test_unit_is_confined_to_its_own_state(unit: str) -> None:
    text = (UNITS / unit).read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "UMask=0077",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StartLimitBurst=",
        "User=",
    ):
        assert directive in text, directive
    writable = re.findall(r"^ReadWritePaths=(.+)$", text, re.MULTILINE)
    assert writable == [f"/var/lib/{unit.removesuffix('.service')}"]
    assert re.search(r"^CapabilityBoundingSet=", text, re.MULTILINE)


def test_the_hub_unit_waits_for_the_drain() -> None:
    text = (UNITS / "agenthub.service").read_text()
    stop = re.search(r"^TimeoutStopSec=([0-9]+)$", text, re.MULTILINE)
    drain = re.search(r"^Environment=HUB_DRAIN_TIMEOUT_S=([0-9.]+)$", text, re.MULTILINE)
    assert stop
    assert drain
    assert float(drain.group(1)) == Settings.model_fields["drain_timeout_s"].default
    # The agents' drain, aiohttp's wait for the requests left (twice at worst), closing the store.
    assert float(stop.group(1)) >= float(drain.group(1)) + 2 * SHUTDOWN_GRACE_S + 5
    assert re.search(r"^KillSignal=SIGTERM$", text, re.MULTILINE)
