DROP TABLE api_keys;
DROP FUNCTION daisy_notify_keys_changed();
