-- SIEM forwarding: its own durable queue, apart from webhook deliveries. An alert's row is
-- written in the transaction that stores the alert, an event's in the one that stores the
-- scoring pass that matched it; `body` is the JSON of one item, fixed then. Rows go once the
-- SIEM answered 2xx. `lease_until` and `lease_node` say which hub node holds a batch in flight;
-- a lease past its time may be taken by any node.
CREATE TABLE siem_queue (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL CHECK (kind IN ('alert', 'event')),
    body            BLOB    NOT NULL,
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL,
    lease_until     REAL,
    lease_node      TEXT
);
CREATE INDEX siem_queue_by_kind ON siem_queue (kind, seq);
