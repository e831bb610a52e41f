//! `testkit`: tasks that misbehave on demand, for Daisy's own test suite.
//!
//! Every task reads its behaviour from its config, so one library serves
//! every fault a test needs. Not meant for production forms.

use std::{thread, time::Duration};

use plugin_api::{Input, Task, TaskError, Value, json};

/// Fails every run with the configured `message`; `retryable` (default false)
/// says whether the error is retryable, and `retry_after_secs` adds a
/// Retry-After to it.
pub struct Fail {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
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
            retry_after: config["retry_after_secs"].as_u64().map(Duration::from_secs),
        })
    }
}

impl Task for Fail {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Err(if self.retryable {
            let err = TaskError::retryable(&self.message);
            match self.retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            }
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

/// Fails retryably until attempt `succeed_on` (naming the run id in the
/// error), then returns `{"attempt": n, "run_id": id}`.
pub struct Flaky {
    succeed_on: u32,
}

impl Flaky {
    /// Config: `{"succeed_on": 3}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        let succeed_on = config["succeed_on"]
            .as_u64()
            .ok_or_else(|| TaskError::permanent("config field 'succeed_on' must be a number"))?;
        Ok(Flaky {
            succeed_on: u32::try_from(succeed_on).unwrap_or(u32::MAX),
        })
    }
}

impl Task for Flaky {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        if input.attempt >= self.succeed_on {
            Ok(json!({ "attempt": input.attempt, "run_id": input.run_id }))
        } else {
            Err(TaskError::retryable(format!(
                "flaky: attempt {} of {} fails (run {})",
                input.attempt, self.succeed_on, input.run_id
            )))
        }
    }
}

/// Throttled, as by an API's 429 with `Retry-After: retry_after_secs`, on
/// the first `times` executions of each run (counted in a file per run id
/// under `dir`), then returns `{"executions": n, "attempt": a}`.
pub struct Throttle {
    times: u64,
    retry_after: Duration,
    dir: std::path::PathBuf,
}

impl Throttle {
    /// Config: `{"times": 2, "retry_after_secs": 1, "dir": "/tmp/t"}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        let dir = config["dir"]
            .as_str()
            .ok_or_else(|| TaskError::permanent("config field 'dir' must be a string"))?;
        Ok(Throttle {
            times: config["times"].as_u64().unwrap_or(1),
            retry_after: Duration::from_secs(config["retry_after_secs"].as_u64().unwrap_or(1)),
            dir: dir.into(),
        })
    }
}

impl Task for Throttle {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        let file = self.dir.join(&input.run_id);
        let executions =
            std::fs::read_to_string(&file).map_or(0, |s| s.trim().parse::<u64>().unwrap_or(0)) + 1;
        std::fs::write(&file, executions.to_string())
            .map_err(|e| TaskError::retryable(format!("writing {}: {e}", file.display())))?;
        if executions <= self.times {
            return Err(TaskError::retryable(format!(
                "429 Too Many Requests (execution {executions})"
            ))
            .with_retry_after(self.retry_after));
        }
        Ok(json!({ "executions": executions, "attempt": input.attempt }))
    }
}

/// Appends `<unix time in ms> <run id>` to `path` on every run: when runs
/// really started, for pacing tests.
pub struct Stamp {
    path: std::path::PathBuf,
}

impl Stamp {
    /// Config: `{"path": "/tmp/stamps"}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        let path = config["path"]
            .as_str()
            .ok_or_else(|| TaskError::permanent("config field 'path' must be a string"))?;
        Ok(Stamp { path: path.into() })
    }
}

impl Task for Stamp {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        use std::io::Write;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| TaskError::retryable(format!("opening {}: {e}", self.path.display())))?;
        // One short line per write: atomic with O_APPEND across processes.
        file.write_all(format!("{now} {}\n", input.run_id).as_bytes())
            .map_err(|e| TaskError::retryable(format!("writing {}: {e}", self.path.display())))?;
        Ok(json!({ "started_ms": now as u64 }))
    }
}

/// Aborts the whole process: a plugin that crashes its host on every run.
pub struct Abort;

impl Abort {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Abort)
    }
}

impl Task for Abort {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        std::process::abort()
    }
}

/// Appends `<submission id> <run id>` as one line to the file
/// `path`, so tests can count how often each run really executed; then
/// sleeps `sleep_ms`. With `effects_dir`, it then applies its side effect
/// once per run, keyed by the run id (the idempotency key a real plugin
/// would send to an outside API): the file `<effects_dir>/<run id>`, created
/// only if absent, holding the submission id.
pub struct Count {
    path: std::path::PathBuf,
    sleep_ms: u64,
    effects_dir: Option<std::path::PathBuf>,
}

impl Count {
    /// Config: `{"path": "/tmp/x", "sleep_ms": 0, "effects_dir": "/tmp/e"}`
    /// (`effects_dir` optional).
    pub fn new(config: Value) -> Result<Self, TaskError> {
        let path = config["path"]
            .as_str()
            .ok_or_else(|| TaskError::permanent("config field 'path' must be a string"))?;
        Ok(Count {
            path: path.into(),
            sleep_ms: config["sleep_ms"].as_u64().unwrap_or(0),
            effects_dir: config["effects_dir"].as_str().map(Into::into),
        })
    }
}

impl Task for Count {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| TaskError::retryable(format!("opening {}: {e}", self.path.display())))?;
        // One write of one short line: atomic with O_APPEND across processes.
        let line = format!("{} {}\n", input.submission_id, input.run_id);
        file.write_all(line.as_bytes())
            .map_err(|e| TaskError::retryable(format!("writing {}: {e}", self.path.display())))?;
        thread::sleep(Duration::from_millis(self.sleep_ms));
        let Some(dir) = &self.effects_dir else {
            return Ok(json!({ "counted": input.submission_id, "run_id": input.run_id }));
        };
        if input.run_id.is_empty() {
            return Err(TaskError::permanent("no run id to key the effect by"));
        }
        let effect = dir.join(&input.run_id);
        let applied = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&effect)
        {
            Ok(mut file) => {
                file.write_all(input.submission_id.as_bytes())
                    .map_err(|e| {
                        TaskError::retryable(format!("writing {}: {e}", effect.display()))
                    })?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                return Err(TaskError::retryable(format!(
                    "creating {}: {e}",
                    effect.display()
                )));
            }
        };
        Ok(json!({
            "counted": input.submission_id,
            "run_id": input.run_id,
            "effect": if applied { "applied" } else { "already applied" },
        }))
    }
}

/// Writes through a null pointer: SIGSEGV on every run.
pub struct Segfault;

impl Segfault {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Segfault)
    }
}

impl Task for Segfault {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        let null: *mut u64 = std::ptr::null_mut();
        // SAFETY: none; this fixture crashes its process on purpose.
        unsafe { std::ptr::write_volatile(null, 42) };
        Ok(Value::Null)
    }
}

/// Ends the whole process with the configured exit `code` (default 3).
pub struct Exit {
    code: i32,
}

impl Exit {
    /// Config: `{"code": 0}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Exit {
            code: config["code"]
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(3),
        })
    }
}

impl Task for Exit {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        std::process::exit(self.code)
    }
}

/// Recurses without end: overflows its thread's stack on every run.
pub struct StackOverflow;

impl StackOverflow {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(StackOverflow)
    }
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    // Never true; it only keeps the compiler from proving the recursion endless.
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + frame[depth as usize % 64]
}

impl Task for StackOverflow {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Ok(json!({ "depth": recurse(0) }))
    }
}

/// Never returns.
pub struct Hang;

impl Hang {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Hang)
    }
}

impl Task for Hang {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Leaks `mib` MiB (default 64) per run, touching every page so that the
/// process's resident memory really grows.
pub struct Leak {
    mib: usize,
}

impl Leak {
    /// Config: `{"mib": 64}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        Ok(Leak {
            mib: config["mib"]
                .as_u64()
                .and_then(|m| usize::try_from(m).ok())
                .unwrap_or(64),
        })
    }
}

impl Task for Leak {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        let leaked: &'static mut [u8] = vec![1u8; self.mib << 20].leak();
        std::hint::black_box(&leaked);
        Ok(json!({ "leaked_mib": self.mib }))
    }
}

/// Sleeps `ms` milliseconds (default 20,000) in its constructor, then echoes.
pub struct SlowNew;

impl SlowNew {
    /// Config: `{"ms": 20000}`.
    pub fn new(config: Value) -> Result<Self, TaskError> {
        thread::sleep(Duration::from_millis(
            config["ms"].as_u64().unwrap_or(20_000),
        ));
        Ok(SlowNew)
    }
}

impl Task for SlowNew {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(json!({ "submission": input.submission }))
    }
}

/// Returns the names and values of the process's environment variables.
pub struct Env;

impl Env {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Env)
    }
}

impl Task for Env {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        let vars: plugin_api::serde_json::Map<String, Value> = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    Value::String(v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        Ok(json!({ "env": vars, "pid": std::process::id() }))
    }
}

/// Returns a string holding a NUL character, which PostgreSQL cannot store.
pub struct Nul;

impl Nul {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Nul)
    }
}

impl Task for Nul {
    fn run(&self, _input: &Input) -> Result<Value, TaskError> {
        Ok(json!({ "text": "x\u{0}y" }))
    }
}

/// Returns what it was given besides the submission: ids, attempt, run id
/// and the submission context.
pub struct Seen;

impl Seen {
    /// Takes no config.
    pub fn new(_config: Value) -> Result<Self, TaskError> {
        Ok(Seen)
    }
}

impl Task for Seen {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        Ok(json!({
            "form_id": input.form_id,
            "submission_id": input.submission_id,
            "attempt": input.attempt,
            "run_id": input.run_id,
            "context": input.context,
        }))
    }
}

plugin_api::export_plugin!(
    "seen" => Seen::new,
    "nul" => Nul::new,
    "segfault" => Segfault::new,
    "exit" => Exit::new,
    "stack_overflow" => StackOverflow::new,
    "hang" => Hang::new,
    "leak" => Leak::new,
    "slow_new" => SlowNew::new,
    "env" => Env::new,
    "flaky" => Flaky::new,
    "throttle" => Throttle::new,
    "stamp" => Stamp::new,
    "abort" => Abort::new,
    "count" => Count::new,
    "fail" => Fail::new,
    "panic" => Panic::new,
    "sleep" => Sleep::new,
    "echo" => Echo::new,
    "config" => Config::new,
    "panic_on_create" => PanicOnCreate::new,
);
