-- Batches stored and not yet scored: written in the transaction that stores the batch's events,
-- deleted in the one that stores the scores they produced. What a hub killed in between, or a
-- commit whose answer was lost (the agent's resend is then all duplicates), leaves behind is
-- scored when its agent's state is next loaded. `first_seq` is the lowest seq the batch stored
-- and `last_seq` the highest, `seqs` all of them when they are not a run (NULL when they are);
-- `node` is the node that stored it and scores it while it lives.
CREATE TABLE scoring_pending (
    agent_id     TEXT    NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    seqs         BLOB,
    node         TEXT    NOT NULL,
    committed_at REAL    NOT NULL,
    PRIMARY KEY (agent_id, first_seq)
);
CREATE INDEX scoring_pending_by_age ON scoring_pending (committed_at);
