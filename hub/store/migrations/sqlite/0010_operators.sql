-- Operator accounts for the web console, and their signed-in sessions.
CREATE TABLE users (
    name                TEXT PRIMARY KEY,
    role                TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash       TEXT NOT NULL,
    created_at          REAL NOT NULL,
    password_changed_at REAL NOT NULL,
    failed_signins      INTEGER NOT NULL DEFAULT 0,
    locked_until        REAL NOT NULL DEFAULT 0,
    last_signin_at      REAL
);

-- `id_hash` is the SHA-256 hex of the cookie value; the value itself is never stored.
CREATE TABLE sessions (
    id_hash      TEXT PRIMARY KEY,
    user_name    TEXT NOT NULL,
    csrf_token   TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_seen_at REAL NOT NULL,
    expires_at   REAL NOT NULL,
    address      TEXT
);
CREATE INDEX sessions_by_user ON sessions (user_name);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
