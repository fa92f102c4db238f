-- Agents whose events are throttled (by an operator, or automatically on an anomalous burst)
-- until an operator lifts it. A table of its own rather than agent columns: an agent that posts
-- signed HTTP batches may have no agents row, and nodes sharing the database see one state.
CREATE TABLE agent_throttles (
    agent_id     TEXT PRIMARY KEY,
    events_per_s REAL NOT NULL,
    reason       TEXT NOT NULL,
    throttled_at REAL NOT NULL,
    throttled_by TEXT NOT NULL
);
