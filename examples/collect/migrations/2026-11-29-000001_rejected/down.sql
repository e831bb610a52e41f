ALTER TABLE responses DROP COLUMN post_processing_error;
UPDATE responses SET post_processing = 'pending' WHERE post_processing = 'rejected';
ALTER TABLE responses DROP CONSTRAINT responses_post_processing_check;
ALTER TABLE responses ADD CONSTRAINT responses_post_processing_check
    CHECK (post_processing IN ('pending', 'done'));
