"""Agents reconnecting continuously: the fast variant of `make soak-reconnect`.

The soak itself is bench/reliability/reconnect.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.reliability.reconnect import Config, Report, Sample, soak

MIB = 2**20


async def test_reconnecting_agents_leave_no_descriptor_behind(tmp_path: Path) -> None:
    """50 agents reconnecting for 15 s: no error, the store holds exactly what was acked, no fd left over.

    15 s is too short for RSS to level off, so its slope is reported here, not bounded:
    the 10-minute soak judges it.
    """
    config = Config(
        agents=50, minutes=0.25, churn_per_s=25, ramp_s=2, warmup_s=3, sample_s=1,
        max_rss_mib_per_min=math.inf, max_fd_per_min=math.inf, workdir=tmp_path,
    )  # fmt: skip
    report = await soak(config, out=lambda _line: None)
    assert report.passed, "\n".join([report.summary(), *report.verdicts(), *report.describe()])
    assert report.sessions > config.agents  # they did reconnect


def _report(rss_mib: list[float], fds: list[int]) -> Report:
    config = Config(agents=10, minutes=1, sample_s=6)
    report = Report(config, Path(), agents_rows=10)
    report.start = Sample(0, 80 * MIB, 20, 0, 0, 0.0)
    report.after = Sample(70, 90 * MIB, 20, 0, 100, 1.0)
    report.samples = [
        Sample(6.0 * (i + 1), int(rss * MIB), fd, 10, 10 * i, 0.1 * i)
        for i, (rss, fd) in enumerate(zip(rss_mib, fds, strict=True))
    ]
    return report


def test_verdict_tells_a_plateau_from_growth() -> None:
    """The verdict is not vacuous: a plateau with noise passes, linear growth of RSS or fds fails."""
    flat = _report(
        [100, 103, 104, 103, 104, 103, 104, 103, 104, 103], [30, 31, 30, 29, 30, 31, 30, 30, 29, 30]
    )
    assert flat.verdicts() == []

    leaking = _report([100 + 0.5 * i for i in range(10)], [30 + i for i in range(10)])
    assert leaking.rss_slope() == pytest.approx(5.0)  # 0.5 MiB every 6 s
    assert leaking.fd_slope() == pytest.approx(10.0)
    assert [problem.split(" over")[0] for problem in leaking.verdicts()] == [
        "RSS grew 5.00 MiB/min",
        "descriptors beyond the connected agents grew 10.00/min",
    ]

    kept = _report([100] * 10, [30] * 10)
    kept.after = Sample(70, 100 * MIB, 40, 0, 100, 1.0)
    assert kept.verdicts() == [
        "the hub holds 40 descriptors after every agent left, 20 before any came (slack 8)"
    ]
