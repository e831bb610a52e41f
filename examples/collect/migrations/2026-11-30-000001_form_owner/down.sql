ALTER TABLE forms DROP COLUMN owner_email;
