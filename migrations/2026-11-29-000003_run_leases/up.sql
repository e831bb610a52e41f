-- A worker holds a claimed run under a lease that it keeps extending while
-- the run executes; the relay re-queues a running run only once its lease
-- has expired (its worker is gone), however long the task may take.
ALTER TABLE task_runs ADD COLUMN lease_until timestamptz;
