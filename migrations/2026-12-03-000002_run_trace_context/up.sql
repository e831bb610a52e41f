-- The W3C traceparent of the Process call that accepted an asynchronous
-- run: its AMQP message carries it, also when the relay republishes it, and
-- the worker's span for the run continues that trace.
ALTER TABLE task_runs ADD COLUMN trace_context text;
