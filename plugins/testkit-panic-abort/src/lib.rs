//! `testkit_panic_abort`: a test fixture whose panics abort the process.
//!
//! Built with `panic = "abort"`, so a panic does not unwind: plugin-api's
//! `catch_unwind` cannot catch it and the host process dies. This is what a
//! plugin built that way does to Daisy, and what Daisy's tests check against.
//! Not meant for production forms.

use plugin_api::{Input, Task, TaskError, Value, json};

/// Panics on every run with the configured `message`, which aborts the process.
pub struct Panic {
    message: String,
}

impl Panic {
    /// Config: `{"message": "..."}` (default "panicked with panic=abort").
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Panic {
            message: config["message"]
                .as_str()
                .unwrap_or("panicked with panic=abort")
                .to_owned(),
        })
    }
}

impl Task for Panic {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        panic!("{}", self.message)
    }
}

/// Returns `{"plugin": "testkit_panic_abort", "submission": ...}`, to show the
/// library loads and runs normally when nothing panics.
pub struct Echo;

impl Echo {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Echo)
    }
}

impl Task for Echo {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(json!({ "plugin": "testkit_panic_abort", "submission": input.submission }))
    }
}

plugin_api::export_plugin!(
    "panic" => Panic::new,
    "echo" => Echo::new,
);
