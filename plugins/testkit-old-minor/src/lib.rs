//! Test fixture: a plugin built against plugin-api 1.0.0, the minor before
//! the one Daisy uses. It knows nothing of run ids, submission context or
//! config schemas, and must still load and run.

use plugin_api::{Input, Task, TaskError, Value, json};

/// Echoes what a 1.0 plugin sees of its input.
struct OldEcho;

impl OldEcho {
    fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(OldEcho)
    }
}

impl Task for OldEcho {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(json!({
            "built_against": plugin_api::INTERFACE_VERSION,
            "form_id": input.form_id,
            "submission_id": input.submission_id,
            "attempt": input.attempt,
            "answers": input.answers(),
        }))
    }
}

plugin_api::export_plugin!("old_echo" => OldEcho::new);
