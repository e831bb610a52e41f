-- The run log and transactional outbox.
--
-- `Process` stores the submission and one `task_runs` row per asynchronous
-- task in one transaction before it answers; publishing to RabbitMQ happens
-- after the commit, and a relay re-publishes every run that is due and was
-- never confirmed (`published_at IS NULL`). Synchronous runs are recorded
-- too, so the log shows every task that was initiated.

CREATE TABLE submissions (
    id         uuid        PRIMARY KEY,
    form_id    uuid        NOT NULL,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE task_runs (
    id              uuid        PRIMARY KEY,
    submission_id   uuid        NOT NULL,
    form_id         uuid        NOT NULL,
    task_id         uuid        NOT NULL,
    task_name       text        NOT NULL,
    is_async        boolean     NOT NULL,
    state           text        NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'retrying', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL DEFAULT 1,
    last_error      text,
    output          jsonb,
    -- When the run may next be published (new runs: after a grace period in
    -- which the accepting proxy publishes them itself; retries: the backoff).
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Set once the broker confirmed the message for the current attempt.
    published_at    timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (submission_id, task_id)
);

-- The relay's work list: due, unconfirmed asynchronous runs.
CREATE INDEX task_runs_unpublished_idx ON task_runs (next_attempt_at)
    WHERE published_at IS NULL AND state IN ('queued', 'retrying');
CREATE INDEX task_runs_state_idx ON task_runs (state, created_at);
CREATE INDEX task_runs_form_idx ON task_runs (form_id, created_at);

-- One row per execution of an asynchronous run, for the history of retries.
CREATE TABLE task_run_attempts (
    run_id      uuid        NOT NULL REFERENCES task_runs (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    worker      text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    outcome     text        NOT NULL,
    error       text,
    PRIMARY KEY (run_id, attempt, started_at)
);
