-- Quotas by design: a task may declare a rate limit. Workers start at most
-- rate_per_minute of its runs a minute, across all workers, evenly spaced;
-- tasks with the same rate_group share one pace (one API account's quota
-- used by many forms), a task without a group has a pace of its own.
ALTER TABLE tasks
    ADD COLUMN rate_per_minute integer
        CONSTRAINT tasks_rate_per_minute_check CHECK (rate_per_minute > 0),
    ADD COLUMN rate_group text
        CONSTRAINT tasks_rate_group_check CHECK (length(rate_group) BETWEEN 1 AND 200);

-- One row per pace (a rate group's name, or a task's id): the earliest time
-- the next run may start (a generic cell rate algorithm: each start moves it
-- one interval on).
CREATE TABLE rate_slots (
    bucket  text        PRIMARY KEY,
    next_at timestamptz NOT NULL
);

-- throttled_ms: how long the run has waited on an API's Retry-After; such
-- waits do not use attempts, up to the worker's --max-throttled-ms.
-- slot_at: the start time a paced run reserved, for when it comes back.
ALTER TABLE task_runs
    ADD COLUMN throttled_ms bigint NOT NULL DEFAULT 0,
    ADD COLUMN slot_at timestamptz;
