-- A drained run costs two row writes, its claim and its finish: the
-- execution that ends a run (succeeded or dead) is recorded on the run
-- itself (its worker in `finished_by`), not as a row of `task_run_attempts`,
-- which keeps only executions that were retried. `run_attempts` shows both
-- as one history. Retrying a dead run copies its last execution into
-- `task_run_attempts` first, so the history survives.
ALTER TABLE task_runs ADD COLUMN finished_by text;

CREATE VIEW run_attempts AS
    SELECT run_id, attempt, worker, started_at, finished_at, outcome, error
    FROM task_run_attempts
    UNION ALL
    SELECT id, attempts, finished_by, started_at, finished_at, state, last_error
    FROM task_runs
    WHERE finished_by IS NOT NULL AND started_at IS NOT NULL AND finished_at IS NOT NULL;
