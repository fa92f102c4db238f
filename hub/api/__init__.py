"""The operator HTTP API under `/api/v1`."""
