"""The hub's pulse: once a second, dashboards get its rates, agent counts and health (`stats`).

One reading per interval serves every dashboard (the bus encodes it once), instead of each
page polling `/api/v1/stats` and `/api/v1/health`. A reading is this node's (its rates, its
connected agents, its scoring backlog; the agent counts by status are the store's), so it goes
to this node's dashboards only and names the node: pushed everywhere, several nodes' readings
would take turns on every page.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hub.ingest import Ingestor
from hub.presence import Presence
from hub.push import PushBus
from hub.scoring import ScoringService
from hub.store import Store


async def beat(
    ingestor: Ingestor,
    scoring: ScoringService,
    presence: Presence,
    store: Store,
    bus: PushBus,
    *,
    node_id: str,
    interval_s: float = 1.0,
) -> None:
    """Publish a `stats` message every `interval_s` until cancelled."""
    last_count, last_at = ingestor.accepted, time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        rate = (ingestor.accepted - last_count) / (now - last_at)
        last_count, last_at = ingestor.accepted, now
        if not bus.subscriber_count:  # nobody to tell: spare the store its query
            continue
        bus.publish_local(
            "stats",
            "hub",
            {
                "ts": time.time(),
                "node": node_id,
                "events_per_s": round(rate, 1),
                "events_accepted": ingestor.accepted,
                "agents_connected": presence.connected,
                "scoring_backlog": scoring.backlog,
                **await _from_store(store),
            },
        )


async def _from_store(store: Store) -> dict[str, Any]:
    """Count agents by status in the store (every node's), which also shows that it answers."""
    try:
        async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancellation on 3.11
            counts = await store.count_agents()
    except Exception:  # whatever the store raises, the dashboards show the same word
        return {"database": "unavailable", "agents": None}
    return {"database": "ok", "agents": counts}
