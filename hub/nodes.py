"""This process's hold on its node id (`HUB_NODE_ID`): two live hubs never share one.

Agents, presence and pending scoring are kept per node id, and a starting node takes every
agent of its id for gone. A second hub started with a live one's id (both defaulting to one
machine's host name, say) would mark the first one's agents offline and score its batches.
So a node holds its id by a lease in the store, renewed every third of `node_lease_s`:

- a free id, or one whose holder stopped cleanly, is taken at once;
- a holder whose process is gone from this machine (a restart after kill -9) is replaced at once;
- any other holder is watched for one of its leases: replaced if it did not renew, refused if it did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from hub.problems import Conflict
from hub.store import Store

log = logging.getLogger(__name__)


async def hold_node_id(store: Store, node_id: str, lease_s: float) -> dict[str, Any]:
    """Take `node_id` for this process and return its lease; Conflict while a live hub holds it."""
    lease = {
        "node_id": node_id,
        "instance": secrets.token_hex(8),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "renewed_at": time.time(),
        "lease_s": lease_s,
    }
    holder = await store.claim_node(lease)
    if holder is None:
        return lease
    if _may_be_alive(holder):
        log.warning(
            "node id %r is held by a hub on %s (pid %d); waiting %.0f s to see whether it is alive",
            node_id, holder["host"], holder["pid"], holder["lease_s"],
        )  # fmt: skip
        await asyncio.sleep(holder["lease_s"])
    lease["renewed_at"] = time.time()
    holder = await store.claim_node(lease, replacing=holder)
    if holder is not None:
        raise Conflict(
            f"node id {node_id!r} is in use by a running hub on {holder['host']} (pid {holder['pid']}): "
            "give each node its own HUB_NODE_ID"
        )
    log.warning("node id %r taken over from a hub that is gone", node_id)
    return lease


async def keep_node_id(store: Store, lease: dict[str, Any]) -> None:
    """Renew `lease` every third of its length until cancelled; Conflict once another hub took the id.

    That happens only when another hub started with this id while this one could not reach the
    store for a whole lease: two hubs must not serve one node id, so the caller stops this one.
    """
    while True:
        await asyncio.sleep(lease["lease_s"] / 3)
        lease["renewed_at"] = time.time()
        try:
            holder = await store.claim_node(lease)
        except Exception as exc:  # the store is away: the next renewal tries again
            log.warning("renewing this node's hold on its id failed (%s); will retry", exc)
            continue
        if holder is not None:
            raise Conflict(
                f"node id {lease['node_id']!r} was taken by a hub on {holder['host']} (pid {holder['pid']}) "
                "while this one could not renew it: give each node its own HUB_NODE_ID"
            )


def _may_be_alive(holder: dict[str, Any]) -> bool:
    if holder["host"] != socket.gethostname() or holder["pid"] == os.getpid():
        return True  # another machine's, or this pid seen from another container: nothing to ask
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


class ClockWatch:
    """This node's clock against the store's, which every node shares (PostgreSQL).

    Nodes judge each other's timestamps: another node's batch pending scoring is taken over
    after `takeover_s`, a command's TTL is checked wherever it is delivered, handover notices
    wait out a grace. A clock far off the others' breaks those quietly (a live node's batches
    scored twice, say), so it is measured and said loudly. SQLite shares this machine's clock.
    """

    def __init__(self, store: Store, max_skew_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._max_skew_s = max_skew_s
        self._clock = clock
        self.skew_s: float | None = None  # this clock minus the store's at the last check, if it has one

    async def check(self) -> None:
        """Measure the skew; log an error when it passes the limit, and when it is back within."""
        before = self._clock()
        theirs = await self._store.clock()
        if theirs is None:
            return
        was_off = self._off
        self.skew_s = (before + self._clock()) / 2 - theirs  # off by at most half the round trip
        if self._off and not was_off:
            log.error(
                "this node's clock is %+.1f s off the store's (HUB_MAX_CLOCK_SKEW_S is %.1f s): nodes "
                "compare each other's times, so synchronize every node's clock (NTP)",
                self.skew_s, self._max_skew_s,
            )  # fmt: skip
        elif was_off and not self._off:
            log.warning("this node's clock is back within %.1f s of the store's", self._max_skew_s)

    async def watch(self, interval_s: float) -> None:
        """Check every `interval_s` until cancelled; return after one check of a store without a clock."""
        while True:
            try:
                await self.check()
            except Exception as exc:  # the store is away: the next check tries again
                log.warning("comparing this node's clock with the store's failed (%s); will retry", exc)
            else:
                if self.skew_s is None:  # SQLite: the store's clock is this machine's
                    return
            await asyncio.sleep(interval_s)

    @property
    def _off(self) -> bool:
        return self.skew_s is not None and abs(self.skew_s) > self._max_skew_s
