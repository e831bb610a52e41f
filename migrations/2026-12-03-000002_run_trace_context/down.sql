ALTER TABLE task_runs DROP COLUMN trace_context;
