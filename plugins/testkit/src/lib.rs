//! `testkit`: tasks that misbehave on demand, for Daisy's own test suite.
//!
//! Every task reads its behaviour from its config, so one library serves
//! every fault a test needs. Not meant for production forms.

use std::{thread, time::Duration};

use plugin_api::{Input, Task, TaskError, Value, json};

/// Fails every run with the configured `message`; `retryable` (default false)
/// says whether the error is retryable.
pub struct Fail {
    message: String,
    retryable: bool,
}

impl Fail {
    /// Config: `{"message": "...", "retryable": bool}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Fail {
            message: config["message"]
                .as_str()
                .unwrap_or("failed on purpose")
                .to_owned(),
            retryable: config["retryable"].as_bool().unwrap_or(false),
        })
    }
}

impl Task for Fail {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Err(if self.retryable {
            TaskError::retryable(&self.message)
        } else {
            TaskError::permanent(&self.message)
        })
    }
}

/// Panics on every run with the configured `message`.
pub struct Panic {
    message: String,
}

impl Panic {
    /// Config: `{"message": "..."}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Panic {
            message: config["message"]
                .as_str()
                .unwrap_or("panicked on purpose")
                .to_owned(),
        })
    }
}

impl Task for Panic {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        panic!("{}", self.message)
    }
}

/// Sleeps `ms` milliseconds, then returns `{"slept_ms": ms}`.
pub struct Sleep {
    ms: u64,
}

impl Sleep {
    /// Config: `{"ms": u64}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        let ms = config["ms"]
            .as_u64()
            .ok_or_else(|| TaskError::permanent("config field 'ms' must be a number"))?;
        Ok(Sleep { ms })
    }
}

impl Task for Sleep {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        thread::sleep(Duration::from_millis(self.ms));
        Ok(json!({ "slept_ms": self.ms }))
    }
}

/// Returns `{"plugin": "testkit", "submission": ...}`: the same task name as
/// `echo` with another output, so tests can swap one library for the other.
pub struct Echo;

impl Echo {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Echo)
    }
}

impl Task for Echo {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(json!({ "plugin": "testkit", "submission": input.submission }))
    }
}

/// Returns its config, to show that the config reaches the task.
pub struct Config(Value);

impl Config {
    /// Any config.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Config(config))
    }
}

impl Task for Config {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Ok(self.0.clone())
    }
}

/// Panics while being built from its config.
pub struct PanicOnCreate;

impl PanicOnCreate {
    /// Always panics.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        panic!("panicked while creating the task")
    }
}

impl Task for PanicOnCreate {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Ok(Value::Null)
    }
}

plugin_api::export_plugin!(
    "fail" => Fail::new,
    "panic" => Panic::new,
    "sleep" => Sleep::new,
    "echo" => Echo::new,
    "config" => Config::new,
    "panic_on_create" => PanicOnCreate::new,
);
