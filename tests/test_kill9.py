"""kill -9 the hub while agents stream: the fast variant of `make soak` (bench/reliability/kill9.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack

from bench.reliability.kill9 import Config, Snapshot, check_store, soak, soak_path


async def test_acked_events_survive_kill_9(tmp_path: Path) -> None:
    """A few SIGKILLs at random moments: nothing acked is lost, nothing is stored twice, all arrives."""
    config = Config(agents=4, kills=3, rate=100, max_up_s=2.0, tail_s=1.0, drain_limit_s=30, workdir=tmp_path)
    report = await soak(config)
    assert report.passed, "\n".join([report.summary(), *report.problems, f"files: {tmp_path}"])


def test_check_store_names_every_broken_promise(tmp_path: Path) -> None:
    """The checker is not vacuous: duplicates, lost acks, gaps, strays and wrong content all show."""
    db = tmp_path / "hub.db"
    conn = sqlite3.connect(db)
    # no primary key here, unlike the hub's table, so that a duplicate can be planted
    conn.execute("CREATE TABLE events (agent_id TEXT, seq INTEGER, body BLOB)")
    rows = [
        ("soak-01", seq, msgpack.packb({"seq": seq, "path": soak_path("soak-01", seq)}))
        for seq in (1, 2, 2, 9)
    ]
    rows += [("soak-01", 4, msgpack.packb({"seq": 4, "path": "/elsewhere"})), ("stranger", 1, b"")]
    conn.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
    conn.execute("CREATE TABLE scoring_pending (agent_id TEXT, first_seq INTEGER)")
    conn.execute("INSERT INTO scoring_pending VALUES ('soak-01', 9)")
    conn.commit()
    conn.close()
    snapshot = Snapshot("soak-01", produced=5, acked=frozenset({1, 2, 3}), acked_seq=3)

    check = check_store(db, [snapshot], final=True)

    assert check.integrity == "ok"
    assert check.problems == [
        "soak-01: 1 events stored more than once",
        "soak-01: 1 acked events are not stored, seqs 3",
        "soak-01: 1 events at or below the acked prefix 3 (gone from the spool) are not stored, seqs 3",
        "soak-01: 1 stored seqs were never produced: 9",
        "soak-01: 2 produced events never stored, seqs 3, 5",
        "soak-01: 1 stored events differ from what was produced: [4]",
        "1 stored batches were never scored",
        "1 stored events belong to no soak agent",
    ]
