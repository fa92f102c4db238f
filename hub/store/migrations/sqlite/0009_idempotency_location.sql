-- Replays of created resources answer with their Location too.
ALTER TABLE idempotency ADD COLUMN location TEXT;
