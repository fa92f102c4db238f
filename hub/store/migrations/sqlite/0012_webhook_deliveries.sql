-- Webhook deliveries: the durable outbox. A row is written in the same transaction as what it
-- announces (an alert, a presence change, a revocation), its `body` fixed then: every attempt
-- sends the same bytes under the same delivery `id`. `lease_until` and `lease_node` say which
-- hub node holds an attempt in flight; a lease past its time may be taken by any node.
CREATE TABLE webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    webhook_id      TEXT    NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_type      TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    state           TEXT    NOT NULL,  -- pending, delivered, dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,              -- pending only
    last_attempt_at REAL,
    last_status     INTEGER,
    last_error      TEXT,
    lease_until     REAL,
    lease_node      TEXT,
    created_at      REAL    NOT NULL,
    delivered_at    REAL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, state, seq);
CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries (created_at) WHERE state != 'pending';

-- When a certificate's coming expiry was announced (certificate_expiring), so it is announced once.
ALTER TABLE certificates ADD COLUMN expiry_notified_at REAL;

-- The event types of issue 5 replace alert/agent/command: alert -> alert_raised and
-- risk_threshold_crossed, agent -> agent_online and agent_offline, command is dropped.
UPDATE webhooks SET event_types = (
    SELECT coalesce(json_group_array(name), '[]') FROM (
        SELECT new.name FROM json_each(webhooks.event_types) AS old
        JOIN (SELECT 'alert' AS old, 'alert_raised' AS name UNION ALL SELECT 'alert', 'risk_threshold_crossed'
              UNION ALL SELECT 'agent', 'agent_offline' UNION ALL SELECT 'agent', 'agent_online') AS new
          ON new.old = old.value
        ORDER BY new.name
    )
);
-- A subscription left with nothing to receive keeps a valid type but is disabled.
UPDATE webhooks SET enabled = 0, event_types = '["alert_raised"]' WHERE event_types = '[]';
