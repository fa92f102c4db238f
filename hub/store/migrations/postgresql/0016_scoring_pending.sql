-- Batches stored and not yet scored: written in the transaction that stores the batch's events,
-- deleted in the one that stores the scores they produced. What a hub killed in between, or a
-- commit whose answer was lost (the agent's resend is then all duplicates), leaves behind is
-- scored when its agent's state is next loaded. `first_seq` is the lowest seq the batch stored;
-- `node`, the node that stored it and scores it while it lives.
CREATE TABLE scoring_pending (
    agent_id     TEXT COLLATE "C" NOT NULL,
    first_seq    BIGINT NOT NULL,
    seqs         BYTEA NOT NULL,
    node         TEXT NOT NULL,
    committed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (agent_id, first_seq)
);
