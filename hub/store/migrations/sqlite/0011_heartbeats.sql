-- Each agent's heartbeats, for its CPU, memory and disk charts; `ts` is when the hub received
-- one. Rows older than `heartbeat_history_s` are pruned by `ts`.
CREATE TABLE heartbeats (
    agent_id     TEXT    NOT NULL,
    ts           REAL    NOT NULL,
    cpu_percent  REAL,
    mem_percent  REAL,
    disk_percent REAL,
    spool_depth  INTEGER,
    dropped      INTEGER,
    uptime_s     REAL,
    PRIMARY KEY (agent_id, ts)
) WITHOUT ROWID;
CREATE INDEX heartbeats_by_ts ON heartbeats (ts);

-- A process's parent pid as a column, so process trees are walked by index both ways.
-- `state` is stored as JSON bytes (a BLOB): read it as text.
ALTER TABLE processes ADD COLUMN ppid INTEGER;
UPDATE processes SET ppid = json_extract(CAST(state AS TEXT), '$.ppid');
CREATE INDEX processes_by_pid ON processes (agent_id, pid, start_ts);
CREATE INDEX processes_by_ppid ON processes (agent_id, ppid);
