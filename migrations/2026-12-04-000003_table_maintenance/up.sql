-- Table maintenance for the outbox's tables, in place of a planner setting.
--
-- Connections used to switch sequential scans off for the planner, because the outbox's
-- key lookups had been planned as whole-table scans while `task_runs` grew
-- from empty faster than autovacuum refreshed its statistics. Every hot
-- statement looks its rows up by a unique key (`id`, `(submission_id,
-- task_id)`) or through the relay's partial index (due, unconfirmed runs),
-- which the planner prefers on its own once it knows the table's size
-- (tests/it/plans.rs checks each one against a busy database). What is left
-- is to keep the statistics and the visibility map close behind the table:
--
-- * `task_runs` is a queue: every run is inserted, claimed and finished, two
--   dead row versions per run. The defaults vacuum and analyze after a fifth
--   (vacuum) or a tenth (analyze) of the table changed, which on ten million
--   runs is two million dead rows in the indexes the claim and the finish
--   walk; here it is 2% (plus 1,000 rows for a small table).
-- * `submissions` and `task_run_attempts` are only inserted into (and
--   pruned): an insert-driven vacuum every 5% keeps their visibility maps
--   current (index-only scans, cheap anti-wraparound vacuums), an analyze
--   every 2% keeps their statistics current.
ALTER TABLE task_runs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);

ALTER TABLE submissions SET (
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);

ALTER TABLE task_run_attempts SET (
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);
