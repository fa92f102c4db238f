"""HMAC-signed HTTP ingest: the same ingest, dedupe and ack as the socket path."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.conftest import ConnectAgent, RunningHub, make_events


async def signing_secret(hub: RunningHub, http: aiohttp.ClientSession, agent_id: str) -> str:
    headers = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
    async with http.post(f"/api/v1/agents/{agent_id}/signing-secret", headers=headers) as response:
        assert response.status == 201
        body = await response.json()
    assert body["agent_id"] == agent_id
    return str(body["secret"])


def signed(
    agent_id: str,
    secret: str,
    body: bytes,
    *,
    stamp: float | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    timestamp = str(int(time.time() if stamp is None else stamp))
    signature = hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).hexdigest()
    return {
        "X-Agent-ID": agent_id,
        "X-Agent-Timestamp": timestamp,
        "X-Agent-Signature": signature,
        "Content-Type": content_type,
    }


async def post(http: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with http.post("/api/v1/events", data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_a_signed_batch_is_stored_and_acked_like_a_socket_batch(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    body = json.dumps({"events": make_events(1, 5)}).encode()
    status, ack = await post(http, body, signed("sensor-7", secret, body))
    assert status == 200
    assert ack == {"accepted": 5, "duplicates": 0, "rejected": [], "last_seq": 5}
    assert await hub.store.count_events("sensor-7") == 5


async def test_msgpack_bodies_and_per_event_rejections_work_over_http(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    events = [*make_events(1, 2), {"seq": 3, "ts": 1.0, "kind": "teleport", "pid": 1}]
    body = msgpack.packb({"events": events})
    status, ack = await post(http, body, signed("sensor-7", secret, body, content_type="application/msgpack"))
    assert status == 200
    assert ack["accepted"] == 2
    assert ack["rejected"][0]["seq"] == 3
    assert "kind" in ack["rejected"][0]["error"]


@pytest.mark.parametrize(
    "fault", ["wrong_secret", "stale", "future", "other_agent", "no_headers", "bad_stamp"]
)
async def test_bad_signatures_are_refused_and_store_nothing(
    hub: RunningHub, http: aiohttp.ClientSession, fault: str
) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    body = json.dumps({"events": make_events(1, 3)}).encode()
    skew = hub.settings.hmac_max_skew_s
    headers = {
        "wrong_secret": lambda: signed("sensor-7", secret + "x", body),
        "stale": lambda: signed("sensor-7", secret, body, stamp=time.time() - skew - 60),
        "future": lambda: signed("sensor-7", secret, body, stamp=time.time() + skew + 60),
        "other_agent": lambda: {**signed("sensor-7", secret, body), "X-Agent-ID": "sensor-8"},
        "no_headers": lambda: {"Content-Type": "application/json"},
        "bad_stamp": lambda: {**signed("sensor-7", secret, body), "X-Agent-Timestamp": "yesterday"},
    }[fault]()
    status, problem = await post(http, body, headers)
    assert status == 401
    assert problem["detail"]
    assert await hub.store.count_events("sensor-7") == 0


async def test_a_replayed_request_is_refused_and_a_fresh_signature_dedupes(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    body = json.dumps({"events": make_events(1, 3)}).encode()
    headers = signed("sensor-7", secret, body)
    assert (await post(http, body, headers))[0] == 200
    status, problem = await post(http, body, headers)
    assert status == 401
    assert "received before" in problem["detail"]
    status, ack = await post(http, body, signed("sensor-7", secret, body, stamp=time.time() + 1))
    assert status == 200
    assert ack["duplicates"] == 3
    assert await hub.store.count_events("sensor-7") == 3


async def test_socket_and_http_share_one_dedupe(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent("agent-1")
    assert (await agent.send({"events": make_events(1, 4)}))["accepted"] == 4
    secret = await signing_secret(hub, http, "agent-1")
    body = json.dumps({"events": make_events(3, 4)}).encode()  # seqs 3..6: two already stored
    status, ack = await post(http, body, signed("agent-1", secret, body))
    assert status == 200
    assert (ack["accepted"], ack["duplicates"], ack["last_seq"]) == (2, 2, 6)
    assert (await agent.send({"events": make_events(6, 2)}))["duplicates"] == 1
    assert await hub.store.count_events("agent-1") == 7


async def test_a_withdrawn_secret_stops_signed_posts(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    admin = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
    async with http.delete("/api/v1/agents/sensor-7/signing-secret", headers=admin) as response:
        assert response.status == 204
    body = json.dumps({"events": make_events(1, 1)}).encode()
    assert (await post(http, body, signed("sensor-7", secret, body)))[0] == 401
    async with http.delete("/api/v1/agents/sensor-7/signing-secret", headers=admin) as response:
        assert response.status == 404


async def test_oversize_and_malformed_batches_are_named(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    too_many = json.dumps({"events": make_events(1, hub.settings.max_batch_events + 1)}).encode()
    status, problem = await post(http, too_many, signed("sensor-7", secret, too_many))
    assert status == 413
    assert "max_batch_events" in problem["detail"]
    not_a_batch = b"[1, 2]"
    status, problem = await post(http, not_a_batch, signed("sensor-7", secret, not_a_batch))
    assert status == 422
    assert "must be an object" in problem["detail"]
    text = b"events"
    status, problem = await post(http, text, signed("sensor-7", secret, text, content_type="text/plain"))
    assert status == 415


async def test_metadata_that_json_cannot_show_is_rejected_and_lists_stay_readable(
    hub: RunningHub, http: aiohttp.ClientSession
) -> None:
    secret = await signing_secret(hub, http, "sensor-7")
    odd = [{"b": b"\xff"}, {"x": msgpack.ExtType(1, b"a")}, {"raw": b"ok"}]
    events = [{**make_events(i + 1, 1)[0], "metadata": value} for i, value in enumerate(odd)]
    events.append({**make_events(4, 1)[0], "metadata": {"fine": [1, "two", None, {"three": 3.0}]}})
    body = msgpack.packb({"events": events})
    status, ack = await post(http, body, signed("sensor-7", secret, body, content_type="application/msgpack"))
    assert status == 200
    assert ack["accepted"] == 1
    assert [r["seq"] for r in ack["rejected"]] == [1, 2, 3]
    async with http.get("/api/v1/events", headers={"Authorization": f"Bearer {hub.token()}"}) as response:
        assert response.status == 200
        assert [e["metadata"] for e in (await response.json())["data"]] == [events[3]["metadata"]]


async def test_revoking_an_agents_certificate_stops_its_signed_posts(
    hub: RunningHub, http: aiohttp.ClientSession, connect_agent: ConnectAgent
) -> None:
    await connect_agent("agent-1")  # the hub learns agent-1's certificate
    secret = await signing_secret(hub, http, "agent-1")
    admin = {"Authorization": f"Bearer {hub.token('hub:admin')}"}
    async with http.get("/api/v1/certificates", params={"agent_id": "agent-1"}, headers=admin) as response:
        fingerprint = (await response.json())["data"][0]["fingerprint"]
    async with http.post(
        f"/api/v1/certificates/{fingerprint}:revoke", json={"reason": "host compromised"}, headers=admin
    ) as response:
        assert response.status == 200
    body = json.dumps({"events": make_events(1, 1)}).encode()
    assert (await post(http, body, signed("agent-1", secret, body)))[0] == 401
