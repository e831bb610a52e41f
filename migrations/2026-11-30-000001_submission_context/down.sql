ALTER TABLE submissions DROP COLUMN context;
