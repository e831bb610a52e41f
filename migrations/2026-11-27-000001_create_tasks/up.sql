-- The task registry: which plugin tasks run for which form.
-- The seed's columns come first; every added column has a default, so an
-- insert that names only the seed's columns works.
CREATE TABLE tasks (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    form_id      uuid        NOT NULL,
    name         text        NOT NULL,
    -- The library is plugins/lib<module>.so; names can never leave that directory.
    module       text        NOT NULL CHECK (module ~ '^[A-Za-z0-9_]+$'),
    func         text        NOT NULL CHECK (func ~ '^[A-Za-z0-9_]+$'),
    async_status boolean     NOT NULL,
    config       jsonb       NOT NULL DEFAULT '{}',
    enabled      boolean     NOT NULL DEFAULT true,
    timeout_ms   integer     NOT NULL DEFAULT 10000 CHECK (timeout_ms > 0),
    max_attempts integer     NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tasks_form_id_idx ON tasks (form_id);

-- Every change to a form's tasks is announced on channel 'daisy_tasks' with
-- the form id as payload ('*' for TRUNCATE), so proxies drop their cached copy.
CREATE FUNCTION daisy_notify_tasks_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('daisy_tasks', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('daisy_tasks', OLD.form_id::text);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('daisy_tasks', NEW.form_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_changed
    AFTER INSERT OR UPDATE OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION daisy_notify_tasks_changed();

CREATE TRIGGER tasks_truncated
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION daisy_notify_tasks_changed();
