-- Alert hygiene. An alert's `fingerprint` (rule, agent, process lineage) lets a repeat fold into
-- the unresolved alert last seen within the suppression window: `count` repeats and `last_seen_at`
-- move on instead of a new row. Alerts from before have no fingerprint and fold nothing.
ALTER TABLE alerts ADD COLUMN fingerprint TEXT;
ALTER TABLE alerts ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE alerts ADD COLUMN last_seen_at REAL;
-- Bodies are JSON text written as bytes: CAST keeps newer SQLite from reading them as JSONB.
UPDATE alerts SET last_seen_at = ts,
    body = json_set(CAST(body AS TEXT), '$.fingerprint', NULL, '$.count', 1, '$.last_seen_at', ts,
                    '$.tags', json(coalesce(json_extract(CAST(body AS TEXT), '$.tags'), '[]')));
CREATE INDEX alerts_by_fingerprint ON alerts (fingerprint, last_seen_at);

-- Webhook routing beyond `min_severity`: a JSON object of optional filters (`rule_ids`, `tags`,
-- `severities`, `agent_groups`, each a list); a subscription gets a notice only if every one matches.
ALTER TABLE webhooks ADD COLUMN routes TEXT NOT NULL DEFAULT '{}';
