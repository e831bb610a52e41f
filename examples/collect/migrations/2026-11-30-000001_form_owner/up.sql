-- The form's owner, sent to Daisy as the submission context's owner_emails.
ALTER TABLE forms ADD COLUMN owner_email text;
