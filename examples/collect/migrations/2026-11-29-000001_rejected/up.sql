-- A response Daisy refused for good (it breaks a limit, or its id clashes)
-- is 'rejected': it leaves the resender's pending list, and the reason is
-- kept for people to see (GET /responses/rejected).
ALTER TABLE responses DROP CONSTRAINT responses_post_processing_check;
ALTER TABLE responses ADD CONSTRAINT responses_post_processing_check
    CHECK (post_processing IN ('pending', 'done', 'rejected'));
ALTER TABLE responses ADD COLUMN post_processing_error text;
