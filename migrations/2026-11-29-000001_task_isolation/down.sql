ALTER TABLE tasks DROP COLUMN isolation;
