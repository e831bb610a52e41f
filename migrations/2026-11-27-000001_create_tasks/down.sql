DROP TABLE tasks;
DROP FUNCTION daisy_notify_tasks_changed();
