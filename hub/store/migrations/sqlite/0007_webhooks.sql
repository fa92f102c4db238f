-- Webhook subscriptions. `seq` orders lists (creation order); `id` is what the API shows.
-- Secrets are stored as they are: deliveries sign with them (HMAC needs the secret itself).
-- `previous_secret` keeps signing beside `secret` until `previous_secret_expires_at` after a rotation.
CREATE TABLE webhooks (
    seq                        INTEGER PRIMARY KEY AUTOINCREMENT,
    id                         TEXT    NOT NULL UNIQUE,
    url                        TEXT    NOT NULL,
    description                TEXT,
    event_types                TEXT    NOT NULL,  -- JSON list
    min_severity               TEXT,
    enabled                    INTEGER NOT NULL,
    secret                     TEXT    NOT NULL,
    previous_secret            TEXT,
    previous_secret_expires_at REAL,
    created_at                 REAL    NOT NULL,
    updated_at                 REAL    NOT NULL,
    created_by                 TEXT    NOT NULL
);
