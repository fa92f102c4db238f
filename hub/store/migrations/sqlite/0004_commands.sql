-- Agent commands and their lifecycle: queued -> delivered -> completed | failed | expired.
-- `seq` orders delivery (creation order) and lists (newest first); `id` is the client's key.
CREATE TABLE commands (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    agent_id     TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    args         TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    created_at   REAL    NOT NULL,
    delivered_at REAL,
    completed_at REAL,
    expires_at   REAL    NOT NULL,
    result       TEXT,
    error        TEXT,
    created_by   TEXT    NOT NULL
);
CREATE INDEX commands_by_agent ON commands (agent_id, seq);
CREATE INDEX commands_by_agent_state ON commands (agent_id, state, seq);
-- Only commands that can still expire are swept; final ones stay out of this index.
CREATE INDEX commands_pending_by_expiry ON commands (expires_at) WHERE state IN ('queued', 'delivered');
