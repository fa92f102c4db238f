"""The spool: seq assignment, persistence, acks and the size bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_client.spool import Spool


def _events(count: int, start: int = 0) -> list[dict[str, object]]:
    return [{"ts": 1.0 + i, "kind": "custom", "pid": start + i} for i in range(count)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool.db")
    yield opened
    opened.close()


def test_seq_is_strictly_increasing(spool: Spool) -> None:
    first = spool.append(_events(3))
    second = spool.append(_events(2))
    assert first == [1, 2, 3]
    assert second == [4, 5]
    assert spool.depth() == 5


def test_seq_survives_reopen_even_when_everything_was_acked(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.append(_events(4))
    spool.ack_through(4)
    spool.close()

    reopened = Spool(path)
    try:
        assert reopened.depth() == 0
        assert reopened.append(_events(1)) == [5]
    finally:
        reopened.close()


def test_pending_returns_full_events_in_order(spool: Spool) -> None:
    spool.append(_events(5))
    pending = spool.pending(after_seq=2, limit=2)
    assert pending == [
        {"seq": 3, "ts": 3.0, "kind": "custom", "pid": 2},
        {"seq": 4, "ts": 4.0, "kind": "custom", "pid": 3},
    ]
    assert spool.pending(after_seq=5, limit=10) == []


def test_seq_given_by_the_caller_is_ignored(spool: Spool) -> None:
    assert spool.append([{"seq": 99, "ts": 1.0, "kind": "custom", "pid": 1}]) == [1]
    assert spool.pending(0, 10)[0]["seq"] == 1


def test_ack_through_deletes_up_to_seq(spool: Spool) -> None:
    spool.append(_events(5))
    spool.ack_through(3)
    assert spool.depth() == 2
    assert [event["seq"] for event in spool.pending(0, 10)] == [4, 5]


def test_ack_through_never_lets_seq_go_back(spool: Spool) -> None:
    spool.append(_events(2))
    spool.ack_through(10)
    assert spool.depth() == 0
    assert spool.append(_events(1)) == [11]
    spool.ack_through(3)  # an old ack changes nothing
    assert spool.append(_events(1)) == [12]


def test_overflow_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, max_events=3)
    spool.append(_events(2))
    spool.append(_events(3, start=10))
    assert spool.depth() == 3
    assert spool.dropped() == 2
    assert [event["pid"] for event in spool.pending(0, 10)] == [10, 11, 12]
    spool.close()

    reopened = Spool(path, max_events=3)
    try:
        assert reopened.dropped() == 2
        assert reopened.depth() == 3
        reopened.append(_events(1, start=20))
        assert reopened.dropped() == 3
        assert [event["seq"] for event in reopened.pending(0, 10)] == [4, 5, 6]
    finally:
        reopened.close()


def test_resume_keeps_everything_the_hub_never_confirmed(spool: Spool) -> None:
    spool.resume(0)  # the first hello: from now on seqs are shared with the hub
    spool.append(_events(5))
    # The hub stored up to 3, but maybe not 1 or 2 (a batch answered `overloaded` while a
    # later one committed): nothing unconfirmed is dropped; resending is deduped.
    assert spool.resume(3) == 0
    assert [event["seq"] for event in spool.pending(0, 10)] == [1, 2, 3, 4, 5]
    spool.ack_through(2)
    assert spool.resume(5) == 2
    assert [event["seq"] for event in spool.pending(0, 10)] == [3, 4, 5]
    spool.ack_through(5)
    assert spool.resume(9) == 5  # empty: confirmed through what it numbered


def test_the_acked_prefix_is_kept_by_the_spool_whatever_the_order(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    assert spool.acked_through() == 0  # no hello yet: nothing is confirmed
    spool.resume(0)
    spool.append(_events(20))
    spool.ack_through(12)
    # A hello arrives while the previous connection's last ack is still being written.
    assert spool.resume(20) == 12
    spool.ack_through(20)
    assert spool.acked_through() == 20
    spool.ack_through(15)  # an old ack changes nothing
    assert spool.acked_through() == 20
    spool.close()

    reopened = Spool(path)
    try:
        assert reopened.acked_through() == 20
    finally:
        reopened.close()


def test_a_replaced_spool_that_grew_past_the_hub_keeps_everything(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "new.db")  # the old spool file was lost; the hub has seqs 1..20
    spool.append(_events(25))
    spool.resume(20)
    assert [event["seq"] for event in spool.pending(0, 100)] == list(range(21, 46))
    assert spool.resume(30) == 20  # synced now: a later hello drops nothing unconfirmed
    assert spool.pending(0, 100)[0]["seq"] == 21
    spool.close()


def test_resume_renumbers_when_the_hub_is_ahead_of_a_lost_spool(spool: Spool) -> None:
    spool.append(_events(3))
    spool.resume(500)
    assert [event["seq"] for event in spool.pending(0, 10)] == [501, 502, 503]
    assert [event["pid"] for event in spool.pending(0, 10)] == [0, 1, 2]
    assert spool.append(_events(1)) == [504]


def test_resume_on_an_empty_spool_moves_next_seq(spool: Spool) -> None:
    spool.resume(42)
    assert spool.append(_events(1)) == [43]


def test_uses_wal_and_full_sync(spool: Spool) -> None:
    db = spool._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_the_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.append([{"ts": 1.0, "kind": "custom", "pid": 1, "argv": ["mysql", "-psecret"]}])
    for path in tmp_path.glob("spool.db*"):
        assert path.stat().st_mode & 0o077 == 0, path
    spool.close()
