-- Who submitted, and for whom (ProcessRequest.context): stored with the
-- submission so that its asynchronous runs see it too. NULL when the backend
-- sent none.
ALTER TABLE submissions ADD COLUMN context jsonb;
