-- The operator audit log (hub/audit.py: each entry chained to the one before by its hash)
-- and revoked operator tokens (hub/tokens.py).
CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY,  -- assigned by the appender: the last id + 1, part of the hash
    ts             REAL    NOT NULL,
    actor          TEXT    NOT NULL,
    token_id       TEXT,
    action         TEXT    NOT NULL,
    method         TEXT    NOT NULL,
    path           TEXT    NOT NULL,
    target         TEXT    NOT NULL,     -- JSON object
    status         INTEGER,
    correlation_id TEXT,
    client         TEXT,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL
);
CREATE INDEX audit_by_actor ON audit_log (actor, id);
CREATE INDEX audit_by_action ON audit_log (action, id);
CREATE INDEX audit_by_ts ON audit_log (ts);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    revoked_at REAL NOT NULL,
    reason     TEXT NOT NULL DEFAULT ''
);
