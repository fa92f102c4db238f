-- How far scoring has got with each agent's events: the highest seq whose effect the stored
-- process states hold, written in the same transaction as those states. Events stored above it
-- when an agent's state is next loaded (the hub was killed between commit and scoring, or a
-- commit's outcome was unknown) are scored then. A table of its own: agents that post signed
-- HTTP batches may have no agents row.
CREATE TABLE scoring_marks (
    agent_id   TEXT COLLATE "C" PRIMARY KEY,
    scored_seq BIGINT NOT NULL
);
-- Everything stored before this migration counts as scored: it was, or `recalculate` replays it.
INSERT INTO scoring_marks (agent_id, scored_seq) SELECT agent_id, max(seq) FROM events GROUP BY agent_id;
