-- Secrets agents sign HTTP event posts with (HMAC needs the secret itself, not a hash of it).
CREATE TABLE agent_secrets (
    agent_id   TEXT PRIMARY KEY,
    secret     TEXT NOT NULL,
    created_at REAL NOT NULL
);
