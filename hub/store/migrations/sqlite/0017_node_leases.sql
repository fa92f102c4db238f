-- Which hub process holds each node id (HUB_NODE_ID): agents, presence and pending scoring are
-- kept per node id, so two live hubs must never share one. `instance` is random per start;
-- `host` and `pid` let a restart on the same machine see at once that the holder is gone.
-- The holder renews `renewed_at` every third of `lease_s`; a clean stop deletes its row.
CREATE TABLE node_leases (
    node_id    TEXT    NOT NULL PRIMARY KEY,
    instance   TEXT    NOT NULL,
    host       TEXT    NOT NULL,
    pid        INTEGER NOT NULL,
    renewed_at REAL    NOT NULL,
    lease_s    REAL    NOT NULL
);
