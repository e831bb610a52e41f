INSERT INTO task_run_attempts (run_id, attempt, worker, started_at, finished_at, outcome, error)
    SELECT id, attempts, finished_by, started_at, finished_at, state, last_error
    FROM task_runs
    WHERE finished_by IS NOT NULL
ON CONFLICT DO NOTHING;
DROP VIEW run_attempts;
ALTER TABLE task_runs DROP COLUMN finished_by;
