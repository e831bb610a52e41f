DROP TABLE task_run_attempts;
DROP TABLE task_runs;
DROP TABLE submissions;
