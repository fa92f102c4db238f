"""The store interface, run on both backends (the `store` fixture: a SQLite file, a PostgreSQL schema)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import msgpack
import pytest

from hub.config import Settings
from hub.models import Event
from hub.problems import Unavailable
from hub.store import EventBatch, EventFilter, Notice, Store, create_store
from hub.store.postgres import numbered
from tests.conftest import run_sql

NOW = 1_700_000_000.0


def _batch(agent_id: str, seqs: range, *, pid: int = 100) -> EventBatch:
    events: list[Event] = [
        {"seq": seq, "ts": NOW + seq, "kind": "process_start", "pid": pid, "exe": "/bin/sh"} for seq in seqs
    ]
    return EventBatch(agent_id, events, [msgpack.packb(event) for event in events], NOW)


def _process(
    agent_id: str, pid: int, risk: float, *, ppid: int | None = None, start: float = NOW
) -> dict[str, Any]:
    key = f"{agent_id}:{pid}:{start}"
    return {"process_id": f"{agent_id}:{pid}", "process_key": key, "agent_id": agent_id, "pid": pid,
            "start_ts": start, "ppid": ppid, "exe": "/bin/sh", "risk_score": risk, "explanation": [],
            "updated_ts": start, "exited": False}  # fmt: skip


def _alert(process: dict[str, Any], ts: float, *, fingerprint: str | None = "fp-1") -> dict[str, Any]:
    return {"agent_id": process["agent_id"], "process_key": process["process_key"], "severity": "HIGH",
            "rule_id": "shell-from-web", "ts": ts, "status": "open", "fingerprint": fingerprint,
            "risk_score": process["risk_score"]}  # fmt: skip


def _webhook(webhook_id: str) -> dict[str, Any]:
    return {"id": webhook_id, "url": "https://siem.example/hook", "description": None,
            "event_types": ["alert_raised"], "min_severity": None, "routes": {}, "enabled": True,
            "secret": "s3cret", "previous_secret": None, "previous_secret_expires_at": None,
            "created_at": NOW, "updated_at": NOW, "created_by": "tester"}  # fmt: skip


async def test_events_are_stored_once_and_read_back_in_order(store: Store) -> None:
    assert await store.commit_events(_batch("agent-1", range(1, 251))) == set(range(1, 251))
    # A resent batch overlapping the stored one: only the new events are new.
    assert await store.commit_events(_batch("agent-1", range(240, 261))) == set(range(251, 261))
    await store.commit_events(_batch("agent-2", range(1, 4), pid=7))
    assert await store.last_seq("agent-1") == 260
    assert await store.last_seq("nobody") == 0
    assert (await store.count_events(), await store.count_events("agent-2")) == (263, 3)

    page = await store.list_events(EventFilter(agent_id="agent-1", since=NOW + 100), after=None, limit=50)
    assert [item["seq"] for item in page.items] == list(range(100, 150))
    following = await store.list_events(EventFilter(agent_id="agent-1"), after=page.next_key, limit=500)
    assert following.items[0]["seq"] == 150
    assert following.next_key is None
    only_pid = await store.list_events(EventFilter(pid=7), after=None, limit=10)
    assert [(item["agent_id"], item["seq"]) for item in only_pid.items] == [("agent-2", 1), ("agent-2", 2),
                                                                          ("agent-2", 3)]  # fmt: skip
    replayed = await store.replay_events(("agent-1", 258), 10)
    assert [(agent, event["seq"]) for agent, event in replayed] == [("agent-1", 259), ("agent-1", 260),
                                                                    ("agent-2", 1), ("agent-2", 2),
                                                                    ("agent-2", 3)]  # fmt: skip


async def test_a_batch_of_scattered_seqs_is_deduplicated_by_its_own_seqs(store: Store) -> None:
    await store.commit_events(_batch("agent-1", range(1, 101)))
    scattered = EventBatch("agent-1", [], [], NOW)
    for seq in (7, 2**62, 150, 99):
        event: Event = {"seq": seq, "ts": NOW, "kind": "login", "pid": 1}
        scattered.events.append(event)
        scattered.bodies.append(msgpack.packb(event))
    assert await store.commit_events(scattered) == {2**62, 150}
    assert await store.count_events("agent-1") == 102


async def test_a_batch_larger_than_one_statement_is_stored_whole(store: Store) -> None:
    assert len(await store.commit_events(_batch("agent-1", range(1, 9_001)))) == 9_000
    assert await store.last_seq("agent-1") == 9_000


async def test_agents_carry_status_heartbeat_and_the_risk_of_their_live_processes(store: Store) -> None:
    beat = {"cpu_percent": 5.0, "mem_percent": 40.0, "disk_percent": 70.0, "spool_depth": 0, "dropped": 0,
            "uptime_s": 12.5}  # fmt: skip
    await store.save_agent(
        "agent-1", {"status": "online", "node": "node-a", "last_seen": NOW, "heartbeat": beat}
    )
    await store.save_agent("agent-2", {"status": "late", "node": "node-b", "last_seen": NOW})
    await store.save_agent("agent-3", {"status": "online", "node": "node-b", "last_seen": NOW})
    await store.insert_alerts([], processes=[_process("agent-3", 1, 91.0), _process("agent-1", 2, 10.0)])

    agent = await store.get_agent("agent-1")
    assert agent is not None
    assert agent["heartbeat"] == beat
    assert agent["risk"] == 10.0
    assert await store.count_agents() == {"online": 2, "late": 1, "offline": 0}
    risky = await store.list_agents(status=None, risk_min=50.0, after=None, limit=10)
    assert [item["agent_id"] for item in risky.items] == ["agent-3"]
    attention = await store.agents_by_attention(10)
    assert [item["agent_id"] for item in attention] == ["agent-2", "agent-3", "agent-1"]
    history = await store.list_heartbeats("agent-1", since=None, until=None, after=None, limit=10)
    assert [item["cpu_percent"] for item in history.items] == [5.0]

    # A node that starts again marks its own agents offline, never another node's.
    await store.mark_node_offline("node-b", "transport_lost", NOW + 1)
    statuses = {item["agent_id"]: item["status"] for item in (await store.agents_by_attention(10))}
    assert statuses == {"agent-1": "online", "agent-2": "offline", "agent-3": "offline"}


async def test_processes_page_by_risk_and_form_trees(store: Store) -> None:
    parent = _process("agent-1", 10, 30.0, start=NOW)
    child = _process("agent-1", 11, 85.0, ppid=10, start=NOW + 1)
    grandchild = _process("agent-1", 12, 60.0, ppid=11, start=NOW + 2)
    await store.insert_alerts([], processes=[parent, child, grandchild])

    first = await store.list_scores(risk_min=40.0, agent_id=None, after=None, limit=1)
    assert [item["risk_score"] for item in first.items] == [85.0]
    rest = await store.list_scores(risk_min=40.0, agent_id=None, after=first.next_key, limit=5)
    assert [item["risk_score"] for item in rest.items] == [60.0]
    assert rest.next_key is None
    (state,) = (await store.scoring_states(["agent-1"])).values()
    assert [process["pid"] for process in state.processes] == [10, 11, 12]
    tree = await store.process_tree(child["process_key"], ancestors=5, descendants=5, limit=10)
    assert tree is not None
    assert [(node["pid"], node["parent_key"]) for node in tree] == [
        (10, None), (11, parent["process_key"]), (12, child["process_key"])]  # fmt: skip


async def test_a_stored_batch_is_pending_scoring_until_its_scores_are_stored(store: Store) -> None:
    async def pending(agent_id: str) -> list[tuple[int, list[int]]]:
        state = (await store.scoring_states([agent_id]))[agent_id]
        return [(batch.first_seq, [event["seq"] for event in batch.events]) for batch in state.pending]

    await store.commit_events(_batch("agent-1", range(1, 4)))
    await store.commit_events(_batch("agent-1", range(2, 6)))  # 2 and 3 are duplicates
    await store.commit_events(_batch("agent-1", range(1, 3)))  # all duplicates: nothing pending
    await store.commit_events(_batch("agent-2", range(7, 9)))
    assert await pending("agent-1") == [(1, [1, 2, 3]), (4, [4, 5])]
    await store.commit_events(_batch("agent-4", range(1, 10, 4)))  # not a run: its seqs are listed
    assert await pending("agent-4") == [(1, [1, 5, 9])]
    (batch,) = (await store.scoring_states(["agent-2"]))["agent-2"].pending
    assert batch.node == socket.gethostname()  # the settings' default node id

    await store.insert_alerts([], scored=[("agent-1", 4)])
    assert await pending("agent-1") == [(1, [1, 2, 3])]
    await store.commit_events(_batch("agent-3", range(1, 3)))
    assert await store.pending_agents(before=0, node="elsewhere") == []
    everyone = ["agent-1", "agent-2", "agent-3", "agent-4"]
    assert await store.pending_agents(before=time.time() + 1) == everyone
    assert await store.pending_agents(before=0, node=socket.gethostname()) == everyone
    await store.replace_scores([], replayed_from=time.time())  # `recalculate` replayed them all
    assert await store.pending_agents(before=time.time() + 1) == []


async def test_a_node_id_is_held_by_one_instance_until_released_or_replaced(store: Store) -> None:
    first = {
        "node_id": "node-a",
        "instance": "one",
        "host": "h1",
        "pid": 10,
        "renewed_at": 100.0,
        "lease_s": 15.0,
    }
    second = {
        "node_id": "node-a",
        "instance": "two",
        "host": "h2",
        "pid": 20,
        "renewed_at": 101.0,
        "lease_s": 9.0,
    }
    assert await store.claim_node(first) is None
    assert await store.claim_node(second) == first  # held: nothing changes
    assert await store.claim_node({**first, "renewed_at": 102.0}) is None  # the holder renews
    assert await store.claim_node(second, replacing=first) == {**first, "renewed_at": 102.0}  # it lived
    assert await store.claim_node(second, replacing={**first, "renewed_at": 102.0}) is None  # it did not
    await store.release_node("node-a", "one")  # no longer the holder: nothing to give up
    assert await store.claim_node(first) == second
    await store.release_node("node-a", "two")
    assert await store.claim_node(first) is None
    assert await store.claim_node({**second, "node_id": "node-b"}) is None  # ids are held apart


async def test_heartbeat_writes_wait_to_share_a_commit_unless_another_write_comes(
    store_settings: Settings,
) -> None:
    commits: list[int] = []  # each group commit's size
    settings = store_settings.model_copy(update={"heartbeat_write_delay_s": 5.0})
    store = create_store(settings, on_commit=lambda size, _: commits.append(size))
    await store.open()
    try:
        beats = [
            asyncio.create_task(store.save_heartbeat(agent, {}, now=NOW, connection=("n", NOW), notices=[]))
            for agent in ("agent-1", "agent-2", "agent-3")
        ]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in beats)  # waiting for company
        assert commits == []
        await store.commit_events(_batch("agent-1", range(1, 4)))  # may not wait: takes them along
        await asyncio.gather(*beats)
        assert commits == [1 + 1 + 1 + 3]
    finally:
        await store.close()


async def test_a_repeated_alert_folds_into_the_open_one_and_announces_once(store: Store) -> None:
    await store.insert_webhook(_webhook("wh_1"), max_count=10)
    process = _process("agent-1", 5, 90.0)
    announce = lambda alert: [Notice("alert_raised", {"alert": alert["id"]}, severity="HIGH")]  # noqa: E731
    first = await store.insert_alerts([_alert(process, NOW)], announce, suppression_window_s=60.0)
    again = await store.insert_alerts([_alert(process, NOW + 30)], announce, suppression_window_s=60.0)
    assert again[0]["id"] == first[0]["id"]
    assert again[0]["count"] == 2
    other = await store.insert_alerts([_alert(process, NOW + 31, fingerprint="fp-2")], announce)
    assert other[0]["id"] != first[0]["id"]

    alert_id = int(first[0]["id"])
    acked = await store.set_alert_status(alert_id, "acknowledged", {"acknowledged_by": "ann"},
                                         allowed_from=("open",))  # fmt: skip
    assert acked is not None
    assert acked["status"] == "acknowledged"
    refused = await store.set_alert_status(alert_id, "acknowledged", {}, allowed_from=("open",))
    assert refused is not None
    assert refused["acknowledged_by"] == "ann"
    page = await store.list_alerts(agent_id="agent-1", severity="HIGH", after=None, limit=10)
    assert [item["id"] for item in page.items] == [other[0]["id"], first[0]["id"]]
    assert (await store.count_deliveries())["pending"] == 2  # two alerts raised, the repeat was no news


async def test_webhook_deliveries_are_leased_one_lane_per_subscription(store: Store) -> None:
    for webhook_id in ("wh_1", "wh_2"):
        assert await store.insert_webhook(_webhook(webhook_id), max_count=2)
    assert not await store.insert_webhook(_webhook("wh_3"), max_count=2)
    for n in range(3):
        await store.enqueue_delivery("wh_1", Notice("alert_raised", {"n": n}), NOW + n)
    await store.enqueue_delivery("wh_2", Notice("alert_raised", {"n": 9}), NOW)

    claimed = await store.claim_deliveries(now=NOW + 10, node="node-a", lease_s=30.0, limit=10)
    assert sorted(row["webhook_id"] for row in claimed) == ["wh_1", "wh_2"]  # the oldest of each
    assert await store.claim_deliveries(now=NOW + 11, node="node-b", lease_s=30.0, limit=10) == []
    first = next(row for row in claimed if row["webhook_id"] == "wh_1")
    done = {"state": "delivered", "attempts": 1, "last_attempt_at": NOW + 12, "last_status": 204,
            "delivered_at": NOW + 12}  # fmt: skip
    assert not await store.finish_delivery(first["id"], "node-b", done)  # not its lease
    assert await store.finish_delivery(first["id"], "node-a", done)
    summaries = await store.delivery_summaries(["wh_1", "wh_2", "wh_none"])
    assert summaries["wh_1"]["pending"] == 2
    assert summaries["wh_1"]["last_status"] == 204
    assert summaries["wh_none"]["pending"] == 0
    assert await store.release_leases("node-a") == 1  # wh_2's attempt goes back to the queue
    assert await store.next_delivery_at(now=NOW + 13) == NOW  # wh_2's, due since NOW


async def test_two_nodes_claiming_at_once_never_share_a_delivery(
    store_settings: Settings, store: Store
) -> None:
    for n in range(20):
        await store.insert_webhook(_webhook(f"wh_{n}"), max_count=50)
        await store.enqueue_delivery(f"wh_{n}", Notice("alert_raised", {"n": n}), NOW)
    other = create_store(store_settings)
    await other.open()
    try:
        claims = await asyncio.gather(*(
            node.claim_deliveries(now=NOW + 1, node=name, lease_s=30.0, limit=3)
            for _ in range(5) for node, name in ((store, "node-a"), (other, "node-b"))))  # fmt: skip
    finally:
        await other.close()
    ids = [row["id"] for claim in claims for row in claim]
    assert len(ids) == len(set(ids)) == 20


async def test_two_nodes_storing_one_batch_at_once_store_it_once(
    store_settings: Settings, store: Store
) -> None:
    # An agent's batch resent through another node while the first still commits it.
    other = create_store(store_settings)
    await other.open()
    try:
        for first in range(1, 2_001, 100):
            batch = _batch("agent-1", range(first, first + 100))
            outcomes = await asyncio.gather(
                store.commit_events(batch), other.commit_events(batch), return_exceptions=True
            )
            new = [outcome for outcome in outcomes if isinstance(outcome, set)]
            # Stored once; each node counts as new only what it stored, or is told to resend.
            assert sorted(len(seqs) for seqs in new) in ([0, 100], [100])
            assert all(isinstance(outcome, set | Unavailable) for outcome in outcomes)
    finally:
        await other.close()
    assert await store.count_events("agent-1") == 2_000


async def test_the_siem_queue_leases_alerts_first_and_trims_events(store: Store) -> None:
    process = _process("agent-1", 5, 90.0)
    events = [{"n": n} for n in range(5)]
    await store.insert_alerts([_alert(process, NOW)], forward_to_siem=True, siem_events=events)
    assert await store.siem_queue_depth() == 6
    kind, rows = await store.claim_siem(
        now=NOW * 2, node="node-a", lease_s=30.0, limit=10, filled_before=NOW * 2
    )
    assert kind == "alert"
    assert len(rows) == 1
    kind, rows = await store.claim_siem(
        now=NOW * 2, node="node-a", lease_s=30.0, limit=10, filled_before=NOW * 2
    )
    assert kind == "event"
    assert len(rows) == 5
    seqs = [row["seq"] for row in rows]
    assert await store.retry_siem(seqs[:2], "node-a", NOW * 2 + 5) == 2
    assert await store.finish_siem(seqs[2:]) == 3
    assert await store.next_siem_at(now=NOW * 2, fill_s=1.0) is not None
    assert await store.trim_siem_queue(2) == 1  # one of the two events left, never the alert
    assert await store.siem_queue_depth() == 2


async def test_commands_move_through_their_states_once(store: Store) -> None:
    command = {"id": "cmd-1", "agent_id": "agent-1", "name": "ping", "args": {"n": 1}, "state": "queued",
               "created_at": NOW, "delivered_at": None, "completed_at": None, "expires_at": NOW + 60,
               "result": None, "error": None, "created_by": "tester"}  # fmt: skip
    stored, created = await store.insert_command(command)
    assert created
    assert stored["args"] == {"n": 1}
    assert (await store.insert_command(command))[1] is False
    assert [c["id"] for c in await store.queued_commands("agent-1", NOW)] == ["cmd-1"]
    delivered = {"state": "delivered", "delivered_at": NOW + 1}
    await store.save_agent("agent-1", {"status": "online", "node": "node-b", "connected_at": NOW})
    for stale in [("node-a", NOW), ("node-b", NOW - 5)]:  # not the connection the store names
        assert (
            await store.transition_command("cmd-1", expect=("queued",), changes=delivered, via=stale) is None
        )
    moved = await store.transition_command(
        "cmd-1", expect=("queued",), changes=delivered, via=("node-b", NOW)
    )
    assert moved is not None
    assert moved["state"] == "delivered"
    assert await store.transition_command("cmd-1", expect=("queued",), changes={"state": "failed"}) is None
    expired = await store.expire_commands(NOW + 61, {"queued": "never delivered", "delivered": "no answer"})
    assert [(c["id"], c["state"], c["error"]) for c in expired] == [("cmd-1", "expired", "no answer")]


async def test_certificates_revocations_idempotency_secrets_and_throttles(store: Store) -> None:
    record = {"fingerprint": "ab" * 32, "agent_id": "agent-1", "serial": "01", "subject": "CN=agent-1",
              "issuer": "CN=ca", "not_before": NOW, "not_after": NOW + 86_400, "source": "uploaded",
              "created_at": NOW, "pem": "-----BEGIN CERTIFICATE-----"}  # fmt: skip
    await store.save_certificate(record)
    assert await store.uploaded_certificates(NOW) == [record["pem"]]
    assert await store.revoke(record["fingerprint"], serial="01", agent_id="agent-1", reason="key lost")
    assert not await store.revoke(record["fingerprint"], serial="01", agent_id="agent-1", reason="again")
    listed = await store.list_certificates(agent_id="agent-1", status="revoked", now=NOW, after=None, limit=5)
    assert listed.items[0]["revocation_reason"] == "key lost"
    assert await store.is_revoked(record["fingerprint"])

    answer = {"request_hash": "h1", "status": 201, "content_type": "application/json", "body": b"{}",
              "location": "/api/v1/x"}  # fmt: skip
    await store.save_idempotent("tester", "key-1", answer, NOW * 2)
    await store.save_idempotent("tester", "key-1", {**answer, "status": 200}, NOW * 2)
    saved = await store.get_idempotent("tester", "key-1", NOW)
    assert saved is not None
    assert (saved["status"], bytes(saved["body"])) == (200, b"{}")

    assert await store.set_agent_secret("agent-1", "one")
    assert await store.set_agent_secret("agent-1", "two")
    assert await store.get_agent_secret("agent-1") == "two"

    throttle = {"agent_id": "agent-1", "events_per_s": 10.0, "reason": "burst", "throttled_at": NOW,
                "throttled_by": "anomaly"}  # fmt: skip
    await store.set_throttle(throttle, replace=False)
    kept = await store.set_throttle({**throttle, "events_per_s": 99.0}, replace=False)
    assert kept["events_per_s"] == 10.0
    replaced = await store.set_throttle({**throttle, "events_per_s": 99.0}, replace=True)
    assert replaced["events_per_s"] == 99.0
    assert await store.delete_throttle("agent-1")


async def test_a_failing_write_does_not_fail_the_others_committed_with_it(store: Store) -> None:
    bad_user = {"name": "mallory", "role": "root", "password_hash": "x", "created_at": NOW,
                "password_changed_at": NOW}  # fmt: skip
    outcomes = await asyncio.gather(
        store.commit_events(_batch("agent-1", range(1, 11))),
        store.insert_user(bad_user),
        store.commit_events(_batch("agent-2", range(1, 11))),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], Unavailable)
    assert await store.count_events() == 20


async def test_writes_are_unavailable_while_postgresql_does_not_answer(postgres_url: str) -> None:
    store = create_store(Settings(database_url=postgres_url, database_timeout_s=2.0))
    await store.open()
    schema = postgres_url.rsplit("search_path=", 1)[1]
    try:
        await store.commit_events(_batch("agent-1", range(1, 3)))
        # Its tables gone stand for a database that cannot do what the hub asks.
        run_sql(f'DROP SCHEMA "{schema}" CASCADE')
        with pytest.raises(Unavailable) as caught:
            await store.commit_events(_batch("agent-1", range(3, 5)))
        assert caught.value.retry_after_ms > 0
    finally:
        await store.close()
        run_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')  # for the fixture to drop


async def test_text_with_a_nul_character_is_stored_on_both_backends(store: Store) -> None:
    await store.save_agent("agent-1", {"status": "online", "hostname": "web\x00one", "last_seen": NOW})
    agent = await store.get_agent("agent-1")
    assert agent is not None
    assert agent["hostname"] in ("web\x00one", "web\ufffdone")  # PostgreSQL text cannot hold NUL


def test_placeholders_become_postgresqls_numbered_ones() -> None:
    assert numbered("SELECT ? FROM t WHERE a = '?' AND b = ?") == "SELECT $1 FROM t WHERE a = '?' AND b = $2"
    # Numbered ones keep their numbers: a value bound once may be used by many rows.
    assert numbered("VALUES (?1,?3,?2),(?1,?4,?2)") == "VALUES ($1,$3,$2),($1,$4,$2)"
    with pytest.raises(ValueError, match="mixes"):
        numbered("VALUES (?1, ?)")
