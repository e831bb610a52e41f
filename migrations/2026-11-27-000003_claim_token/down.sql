ALTER TABLE task_runs DROP COLUMN claim_token;
