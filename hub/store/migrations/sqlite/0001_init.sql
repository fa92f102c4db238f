-- Events: the dedupe key is the primary key, so a retried batch cannot store twice.
CREATE TABLE events (
    agent_id    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    ts          REAL    NOT NULL,
    kind        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    received_at REAL    NOT NULL,
    body        BLOB    NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;

CREATE TABLE agents (
    agent_id          TEXT PRIMARY KEY,
    status            TEXT NOT NULL DEFAULT 'offline',
    status_reason     TEXT,
    status_changed_at REAL,
    connected_at      REAL,
    last_seen         REAL,
    hostname          TEXT,
    agent_version     TEXT,
    platform          TEXT,
    cert_fingerprint  TEXT,
    heartbeat         TEXT
);

CREATE TABLE processes (
    process_key TEXT PRIMARY KEY,
    agent_id    TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    start_ts    REAL    NOT NULL,
    risk_score  REAL    NOT NULL,
    exited      INTEGER NOT NULL DEFAULT 0,
    updated_ts  REAL    NOT NULL,
    state       TEXT    NOT NULL
);
CREATE INDEX processes_by_agent ON processes (agent_id, exited);
CREATE INDEX processes_by_risk ON processes (risk_score DESC, process_key);

CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id    TEXT    NOT NULL,
    process_key TEXT    NOT NULL,
    severity    TEXT    NOT NULL,
    rule_id     TEXT    NOT NULL,
    ts          REAL    NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'open',
    body        TEXT    NOT NULL
);
CREATE INDEX alerts_by_agent ON alerts (agent_id, id);

CREATE TABLE revocations (
    fingerprint TEXT PRIMARY KEY,
    serial      TEXT,
    agent_id    TEXT,
    reason      TEXT,
    revoked_at  REAL NOT NULL
);
