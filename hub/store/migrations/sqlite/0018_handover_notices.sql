-- A stopping node announces each agent it sends away (agent_offline, reason server_shutdown)
-- only after a grace (`next_attempt_at` in the future), marked with the agent's id. If the
-- agent connects again first, to any node, that delivery is withdrawn and its return is not
-- announced either: a restart or a rolling upgrade tells webhooks nothing.
ALTER TABLE webhook_deliveries ADD COLUMN handover_of TEXT;
CREATE INDEX webhook_deliveries_by_handover ON webhook_deliveries (handover_of) WHERE handover_of IS NOT NULL;
