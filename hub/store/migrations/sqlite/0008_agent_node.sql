-- The hub node an agent is connected to (several nodes may share one database).
ALTER TABLE agents ADD COLUMN node TEXT;
