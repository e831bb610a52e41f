-- Synchronous runs go back into `task_runs`, one per (submission, task) as
-- its unique constraint wants: the first, as the read side showed them.
INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, state,
                       attempts, max_attempts, last_error, output, next_attempt_at,
                       started_at, finished_at, created_at, updated_at)
SELECT DISTINCT ON (submission_id, task_id)
       id, submission_id, form_id, task_id, task_name, false, state, 1, 1, error, output,
       started_at, started_at, finished_at, finished_at, finished_at
FROM sync_runs
ORDER BY submission_id, task_id, started_at, id
ON CONFLICT DO NOTHING;

-- With its partitions.
DROP TABLE sync_runs;
