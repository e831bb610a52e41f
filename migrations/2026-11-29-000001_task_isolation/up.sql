-- Where a task's plugin code runs: in a supervised plugin-host process
-- ('process') or inside daisy serve/worker ('in_process', for trusted,
-- latency-critical plugins). NULL follows the server's --isolation default.
ALTER TABLE tasks ADD COLUMN isolation text
    CONSTRAINT tasks_isolation_check CHECK (isolation IN ('process', 'in_process'));
