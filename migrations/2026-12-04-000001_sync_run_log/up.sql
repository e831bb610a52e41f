-- The synchronous run log leaves the outbox.
--
-- Finished synchronous runs were rows of `task_runs`, the asynchronous
-- runs' outbox, paying for its primary key, its unique (submission_id,
-- task_id), its state and form indexes and its updatable row layout on every
-- `Process` call. They now go to `sync_runs`, append-only:
--
-- * range-partitioned by day on `started_at` (UTC), so retention drops whole
--   days instead of deleting rows. `daisy serve` creates the partitions for
--   today and the next two days at start and every ten minutes; a row whose
--   day has no partition goes to `sync_runs_default`, so an insert never
--   fails for lack of one (retention deletes old rows from the default
--   partition in batches, and preparing a day moves that day's rows out);
-- * three indexes, each for a read path: the primary key (id, started_at)
--   for the run page (diesel also needs a primary key, and on a partitioned
--   table it must hold the partition key), (submission_id) for GetRuns and
--   for telling a replay's record from the first, (started_at, id) for the
--   newest-first console pages and `daisy runs list` (keyset pagination);
-- * no unique constraint: a replayed submission's synchronous tasks run
--   again and are logged again; the read side shows the first record per
--   (submission, task), the earliest by (started_at, id).
--
-- Per-partition autovacuum settings (storage parameters do not exist on a
-- partitioned parent): insert-only partitions get a vacuum every 500,000
-- inserts whatever their size, which only visits the pages added since the
-- last one, and freeze what they visit, so no anti-wraparound vacuum has to
-- rewrite a finished day later.

CREATE TABLE sync_runs (
    id            uuid        NOT NULL,
    submission_id uuid        NOT NULL,
    form_id       uuid        NOT NULL,
    task_id       uuid        NOT NULL,
    task_name     text        NOT NULL,
    state         text        NOT NULL CHECK (state IN ('succeeded', 'dead')),
    error         text,
    output        jsonb,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    PRIMARY KEY (id, started_at)
) PARTITION BY RANGE (started_at);

CREATE INDEX sync_runs_submission_idx ON sync_runs (submission_id);
CREATE INDEX sync_runs_started_idx ON sync_runs (started_at, id);

CREATE TABLE sync_runs_default PARTITION OF sync_runs DEFAULT
    WITH (autovacuum_vacuum_insert_threshold = 500000,
          autovacuum_vacuum_insert_scale_factor = 0,
          autovacuum_freeze_min_age = 0);

-- History: one partition per day that has synchronous runs, then the rows.
DO $$
DECLARE
    day date;
BEGIN
    FOR day IN
        SELECT DISTINCT (coalesce(started_at, created_at) AT TIME ZONE 'UTC')::date
        FROM task_runs WHERE NOT is_async
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF sync_runs FOR VALUES FROM (%L) TO (%L) '
            'WITH (autovacuum_vacuum_insert_threshold = 500000, '
            'autovacuum_vacuum_insert_scale_factor = 0, autovacuum_freeze_min_age = 0)',
            'sync_runs_' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END
$$;

INSERT INTO sync_runs (id, submission_id, form_id, task_id, task_name, state, error, output,
                       started_at, finished_at)
SELECT id, submission_id, form_id, task_id, task_name, state, last_error, output,
       coalesce(started_at, created_at), coalesce(finished_at, started_at, created_at)
FROM task_runs WHERE NOT is_async;

DELETE FROM task_runs WHERE NOT is_async;
