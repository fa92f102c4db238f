"""Operator accounts and web sessions in the SQLite store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hub.problems import Unavailable
from hub.store import Store


def _user(name: str, role: str = "operator") -> dict[str, Any]:
    return {"name": name, "role": role, "password_hash": f"hash-{name}", "created_at": 100.0,
            "password_changed_at": 100.0}  # fmt: skip


def _session(id_hash: str, user_name: str, *, expires_at: float = 1000.0) -> dict[str, Any]:
    return {"id_hash": id_hash, "user_name": user_name, "csrf_token": f"csrf-{id_hash}", "created_at": 100.0,
            "last_seen_at": 100.0, "expires_at": expires_at, "address": "127.0.0.1"}  # fmt: skip


async def test_a_user_is_stored_once_with_defaults(store: Store) -> None:
    assert await store.insert_user(_user("alice")) is True
    assert await store.insert_user(_user("alice", "admin")) is False
    assert await store.get_user("alice") == {
        **_user("alice"),
        "failed_signins": 0,
        "locked_until": 0,
        "last_signin_at": None,
    }
    assert await store.get_user("nobody") is None


async def test_an_unknown_role_or_column_is_refused(store: Store) -> None:
    with pytest.raises(Unavailable) as refused:
        await store.insert_user(_user("mallory", "root"))
    assert "check constraint" in str(refused.value.__cause__).lower()
    with pytest.raises(ValueError, match="unknown user columns"):
        await store.insert_user({**_user("mallory"), "is_admin": 1})
    assert await store.get_user("mallory") is None


async def test_users_are_listed_by_name_without_password_hashes(store: Store) -> None:
    for name in ("carol", "alice", "bob"):
        await store.insert_user(_user(name))
    users = await store.list_users()
    assert [user["name"] for user in users] == ["alice", "bob", "carol"]
    assert all("password_hash" not in user for user in users)
    assert set(users[0]) == {"name", "role", "created_at", "password_changed_at", "failed_signins",
                             "locked_until", "last_signin_at"}  # fmt: skip


async def test_only_changeable_columns_are_updated(store: Store) -> None:
    await store.insert_user(_user("alice"))
    change = {"role": "admin", "password_hash": "new", "password_changed_at": 200.0, "failed_signins": 0,
              "locked_until": 300.0, "last_signin_at": 250.0}  # fmt: skip
    assert await store.update_user("alice", change) is True
    assert await store.get_user("alice") == {**_user("alice"), **change}
    assert await store.update_user("nobody", {"role": "viewer"}) is False
    for refused in ({"name": "eve"}, {"created_at": 1.0}, {}):
        with pytest.raises(ValueError, match="cannot change user columns"):
            await store.update_user("alice", refused)
    assert (await store.get_user("alice") or {})["name"] == "alice"


async def test_signin_failures_count_up_atomically(store: Store) -> None:
    await store.insert_user(_user("alice"))
    counts = await asyncio.gather(*(store.add_signin_failure("alice") for _ in range(5)))
    assert sorted(c for c in counts if c is not None) == [1, 2, 3, 4, 5]
    assert (await store.get_user("alice") or {})["failed_signins"] == 5
    assert await store.add_signin_failure("nobody") is None


async def test_a_session_carries_its_users_current_role(store: Store) -> None:
    await store.insert_user(_user("alice", "viewer"))
    await store.insert_session(_session("h1", "alice"))
    assert await store.get_session("h1") == {**_session("h1", "alice"), "role": "viewer"}
    await store.update_user("alice", {"role": "admin"})
    assert (await store.get_session("h1") or {})["role"] == "admin"
    assert await store.get_session("nope") is None


async def test_a_session_whose_user_is_gone_is_not_returned(store: Store) -> None:
    await store.insert_session(_session("orphan", "ghost"))
    assert await store.get_session("orphan") is None


async def test_touching_a_session_moves_its_expiry(store: Store) -> None:
    await store.insert_user(_user("alice"))
    await store.insert_session(_session("h1", "alice"))
    await store.touch_session("h1", last_seen_at=150.0, expires_at=2000.0)
    session = await store.get_session("h1") or {}
    assert (session["last_seen_at"], session["expires_at"], session["created_at"]) == (150.0, 2000.0, 100.0)


async def test_sessions_are_deleted_one_by_user_and_when_expired(store: Store) -> None:
    for name in ("alice", "bob"):
        await store.insert_user(_user(name))
    await store.insert_session(_session("a1", "alice"))
    await store.insert_session(_session("a2", "alice", expires_at=50.0))
    await store.insert_session(_session("a3", "alice"))
    await store.insert_session(_session("b1", "bob", expires_at=60.0))
    await store.insert_session(_session("b2", "bob"))
    assert await store.delete_session("a1") is True
    assert await store.delete_session("a1") is False
    assert await store.prune_sessions(60.0) == 2  # a2 and b1: expiry at `now` counts as expired
    assert await store.get_session("b1") is None
    assert await store.delete_sessions("alice") == 1
    assert await store.get_session("a3") is None
    assert await store.get_session("b2") is not None


async def test_deleting_a_user_deletes_their_sessions(store: Store) -> None:
    for name in ("alice", "bob"):
        await store.insert_user(_user(name))
    await store.insert_session(_session("a1", "alice"))
    await store.insert_session(_session("b1", "bob"))
    assert await store.delete_user("alice") is True
    assert await store.delete_user("alice") is False
    assert await store.get_user("alice") is None
    assert await store.delete_sessions("alice") == 0  # none left behind
    assert await store.get_session("b1") is not None
