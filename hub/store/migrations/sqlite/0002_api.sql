-- The operator API: idempotent replays survive a restart; alert filters by status.
CREATE TABLE idempotency (
    owner        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    status       INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    expires_at   REAL    NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE INDEX alerts_by_status ON alerts (status, id);
