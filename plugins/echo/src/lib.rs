//! `echo`: returns the submission it was given, unchanged.
//!
//! The smallest useful plugin, and a template for new ones. Config: none.

use plugin_api::{Input, Task, TaskError, Value};

/// Returns the submission as its output.
pub struct Echo;

impl Echo {
    /// Builds the task; it takes no configuration.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Echo)
    }
}

impl Task for Echo {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(input.submission.clone())
    }
}

plugin_api::export_plugin!("echo" => Echo::new);

#[cfg(test)]
mod tests {
    use plugin_api::json;

    use super::*;

    #[test]
    fn echo_returns_the_submission() {
        let submission = json!({"name": "Ada", "age": 36});
        let input = Input::new("f", "s", submission.clone(), 1);
        let output = Echo::new(json!({})).and_then(|t| t.run(&input));
        assert_eq!(output, Ok(submission));
    }
}
