-- Agent certificates the hub knows: uploaded by operators (trusted by exact fingerprint),
-- issued through the API, or issued by the CLI and first seen at connect. Revocation lives
-- in `revocations` (one place, which also covers fingerprints never recorded here).
CREATE TABLE certificates (
    fingerprint TEXT PRIMARY KEY,  -- SHA-256 of the DER encoding, lowercase hex
    agent_id    TEXT NOT NULL,     -- = the subject CN
    serial      TEXT NOT NULL,     -- hex
    subject     TEXT NOT NULL,     -- RFC 4514
    issuer      TEXT NOT NULL,
    not_before  REAL NOT NULL,
    not_after   REAL NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('uploaded', 'issued')),
    created_at  REAL NOT NULL,
    pem         TEXT NOT NULL
);
CREATE INDEX certificates_by_expiry ON certificates (not_after, fingerprint);
CREATE INDEX certificates_by_agent ON certificates (agent_id, not_after, fingerprint);
CREATE INDEX certificates_uploaded ON certificates (source, not_after);
