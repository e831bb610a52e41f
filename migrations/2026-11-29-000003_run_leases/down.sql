ALTER TABLE task_runs DROP COLUMN lease_until;
