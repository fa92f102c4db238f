"""kill -9 the hub while agents stream: the fast variant of `make soak` (bench/reliability/kill9.py)."""

from __future__ import annotations

from pathlib import Path

from bench.reliability.kill9 import Config, soak


async def test_acked_events_survive_kill_9(tmp_path: Path) -> None:
    """A few SIGKILLs at random moments: nothing acked is lost, nothing is stored twice, all arrives."""
    config = Config(agents=4, kills=3, rate=100, max_up_s=2.0, tail_s=1.0, drain_limit_s=30, workdir=tmp_path)
    report = await soak(config)
    assert report.passed, "\n".join([report.summary(), *report.problems, f"files: {tmp_path}"])
