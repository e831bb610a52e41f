ALTER TABLE task_runs DROP COLUMN slot_at, DROP COLUMN throttled_ms;
DROP TABLE rate_slots;
ALTER TABLE tasks DROP COLUMN rate_group, DROP COLUMN rate_per_minute;
