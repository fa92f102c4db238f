"""What webhooks are told: the body of each event type, and the watch on expiring certificates.

Every body carries `event_type`, `timestamp` (when it happened, Unix seconds), and
`process_id`, `risk_score` and `threshold` (null for events about no process), then the
fields of its type; the store adds each delivery's `delivery_id`. An alert is announced
once as `alert_raised`, and once more as `risk_threshold_crossed` when a risk threshold
raised it; a repeat folded into an open alert (`hub.scoring`) is not announced again. Which
subscriptions get a notice is the store's routing (`hub.store.Notice.routed`). Notices are
written to the outbox in the transaction that stores what they announce, so a committed alert
is never left unannounced.

The SIEM (`hub.siem`) is told every alert as stored, and every event that matched a rule of
`siem_min_event_severity` or above, with the rules it matched; its rows are written the same way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Literal

from hub.config import Settings
from hub.models import SEVERITY_ORDER, Event
from hub.rules import Rule
from hub.store import Notice, Store

log = logging.getLogger(__name__)
EventType = Literal[
    "alert_raised",
    "risk_threshold_crossed",
    "agent_offline",
    "agent_online",
    "certificate_expiring",
    "certificate_revoked",
]
ALERT_TYPES: frozenset[str] = frozenset(
    {"alert_raised", "risk_threshold_crossed"}
)  # min_severity filters these
_NO_PROCESS = {"process_id": None, "risk_score": None, "threshold": None}


def alert_notices(alert: dict[str, Any]) -> list[Notice]:
    """Announce a stored alert: raised, and a risk threshold crossed when one raised it."""
    body = {
        "timestamp": alert["ts"],
        "process_id": alert["process_id"],
        "risk_score": alert["risk_score"],
        "threshold": alert["threshold"],
        "alert_id": alert["id"],
        "agent_id": alert["agent_id"],
        "severity": alert["severity"],
        "rule_id": alert["rule_id"],
        "title": alert["title"],
        "mitre": alert["mitre"],
        "tags": alert["tags"],
        "fingerprint": alert["fingerprint"],
    }
    types = ["alert_raised"] + (["risk_threshold_crossed"] if alert["threshold"] is not None else [])
    route = {"severity": alert["severity"], "agent_id": alert["agent_id"], "rule_id": alert["rule_id"],
             "tags": tuple(alert["tags"])}  # fmt: skip
    return [Notice(kind, {"event_type": kind, **body}, **route) for kind in types]


def presence_notices(
    agent_id: str, status: str, reason: str, now: float, *, handover_grace_s: float = 0.0
) -> list[Notice]:
    """Announce an agent connecting or going offline; `late`, and back from late, are not announced.

    An agent a stopping node sent away is announced after `handover_grace_s`, unless it has
    connected again by then (`Store.save_agent`'s `returning_within_s`).
    """
    if status != "offline" and reason not in ("connected", "restored"):
        return []
    kind = f"agent_{status}"
    body = {"event_type": kind, "timestamp": now, **_NO_PROCESS, "agent_id": agent_id, "reason": reason}
    handover = reason == "server_shutdown" and handover_grace_s > 0
    first_attempt_at = now + handover_grace_s if handover else None
    return [Notice(kind, body, agent_id=agent_id, first_attempt_at=first_attempt_at,
                   handover_of=agent_id if handover else None)]  # fmt: skip


def revocation_notice(record: dict[str, Any], reason: str, now: float) -> Notice:
    """Announce that an agent certificate was revoked."""
    return Notice(
        "certificate_revoked",
        {"event_type": "certificate_revoked", "timestamp": now, **_NO_PROCESS, **_certificate(record),
         "reason": reason},
        agent_id=record["agent_id"],
    )  # fmt: skip


def expiring_notice(record: dict[str, Any], now: float) -> Notice:
    """Announce that an agent certificate expires soon."""
    body = {"event_type": "certificate_expiring", "timestamp": now, **_NO_PROCESS, **_certificate(record),
            "expires_in_s": round(record["not_after"] - now, 3)}  # fmt: skip
    return Notice("certificate_expiring", body, agent_id=record["agent_id"])


def ping_notice(webhook_id: str, now: float) -> Notice:
    """A test delivery an operator asks for: sent to one subscription whatever it subscribes to."""
    return Notice("ping", {"event_type": "ping", "timestamp": now, **_NO_PROCESS, "webhook_id": webhook_id})


def siem_event(agent_id: str, event: Event, rules: list[Rule], min_severity: str) -> dict[str, Any] | None:
    """What the SIEM is told of an event matching `rules`; None below `min_severity`."""
    severity = max((rule.severity for rule in rules), key=SEVERITY_ORDER.__getitem__)
    if SEVERITY_ORDER[severity] < SEVERITY_ORDER[min_severity]:
        return None
    matched = [{"rule_id": rule.id, "name": rule.name, "severity": rule.severity, "mitre": rule.mitre}
               for rule in rules]  # fmt: skip
    return {"agent_id": agent_id, "process_id": f"{agent_id}:{event['pid']}", "timestamp": event["ts"],
            "severity": severity, "rules": matched, "event": event}  # fmt: skip


def _certificate(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_id": record["agent_id"],
        "fingerprint": record["fingerprint"],
        "serial": record["serial"],
        "not_after": record["not_after"],
    }


def _expiring_at(now: float, record: dict[str, Any]) -> Notice:
    return expiring_notice(record, now)


async def watch_expiring_certificates(settings: Settings, store: Store) -> None:
    """Announce each certificate once as it comes within the configured days of expiry, until cancelled."""
    window_s = settings.webhook_certificate_expiring_days * 86_400.0
    while True:
        try:
            now = time.time()
            notice = functools.partial(_expiring_at, now)
            count = await store.notify_expiring_certificates(now=now, until=now + window_s, notice=notice)
            if count:
                log.info("announced %d certificates expiring within %g days", count, window_s / 86_400)
        except Exception:  # the store failed: the next check catches up
            log.exception("checking for expiring certificates failed; will retry")
        await asyncio.sleep(settings.webhook_certificate_check_interval_s)
