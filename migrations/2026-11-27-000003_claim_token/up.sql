-- Which delivery holds a run's claim, so a worker that retries its claim
-- after an ambiguous commit (the connection dropped before the answer came
-- back) recognises its own claim instead of taking it for another's.
ALTER TABLE task_runs ADD COLUMN claim_token uuid;
