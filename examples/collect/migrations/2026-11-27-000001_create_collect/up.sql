-- The Collect backend: forms with questions, responses with answers.

CREATE TABLE forms (
    id         uuid        PRIMARY KEY,
    title      text        NOT NULL,
    metadata   jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE questions (
    id       uuid    PRIMARY KEY,
    form_id  uuid    NOT NULL REFERENCES forms (id) ON DELETE CASCADE,
    -- How answers name the question: {"answers": {"<key>": value}}.
    key      text    NOT NULL,
    label    text    NOT NULL,
    kind     text    NOT NULL CHECK (kind IN ('text', 'number', 'boolean', 'choice')),
    required boolean NOT NULL DEFAULT false,
    options  jsonb   NOT NULL DEFAULT '[]',
    position integer NOT NULL,
    metadata jsonb   NOT NULL DEFAULT '{}',
    UNIQUE (form_id, key)
);

CREATE TABLE responses (
    id                uuid        PRIMARY KEY,
    form_id           uuid        NOT NULL REFERENCES forms (id) ON DELETE CASCADE,
    metadata          jsonb       NOT NULL DEFAULT '{}',
    submitted_at      timestamptz NOT NULL DEFAULT now(),
    -- Born 'pending' in the response's own transaction; 'done' once Daisy accepted it.
    post_processing   text        NOT NULL DEFAULT 'pending'
        CHECK (post_processing IN ('pending', 'done')),
    post_processed_at timestamptz
);

CREATE INDEX responses_pending_idx ON responses (submitted_at) WHERE post_processing = 'pending';

CREATE TABLE answers (
    response_id uuid  NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    question_id uuid  NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
    value       jsonb NOT NULL,
    PRIMARY KEY (response_id, question_id)
);
