-- Tasks quarantined by a serve or worker because their plugin build kept
-- crashing its host: written when it happens, read by `daisy plugin list`.
-- A build is identified by its library's SHA-256, so a new build is never
-- quarantined by an old build's record.
CREATE TABLE plugin_quarantines (
    sha256 text NOT NULL,
    func text NOT NULL,
    module text NOT NULL,
    crashes integer NOT NULL,
    quarantined_until timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sha256, func)
);
