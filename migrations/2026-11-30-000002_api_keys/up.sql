-- API keys: who may call Daisy, and for which forms. Only a token's SHA-256
-- is stored; the token itself is shown once, when the key is created.
CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    token_sha256 bytea NOT NULL UNIQUE,
    -- The forms the key may use; NULL: every form.
    forms uuid[],
    admin boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);

-- Every running serve reloads its keys on this notification, so that a
-- revocation takes effect at once. last_used_at changes do not notify.
CREATE FUNCTION daisy_notify_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('daisy_keys', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF name, token_sha256, forms, admin, revoked_at
    ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION daisy_notify_keys_changed();
