//! The plugin interface of Daisy: the only crate a task plugin depends on.
//!
//! A plugin is one `cdylib` crate that exports one or more *tasks*. A task is
//! created once from its JSON configuration (the `config` column of its row in
//! `tasks`) and then run many times, concurrently, on submissions:
//!
//! ```
//! use plugin_api::{Input, Task, TaskError, Value, json};
//!
//! /// Returns the submission it was given.
//! struct Echo;
//!
//! impl Echo {
//!     fn new(_config: Value) -> Result<Self, TaskError> {
//!         Ok(Echo)
//!     }
//! }
//!
//! impl Task for Echo {
//!     fn run(&self, input: &Input) -> Result<Value, TaskError> {
//!         Ok(json!({ "echo": input.submission }))
//!     }
//! }
//!
//! plugin_api::export_plugin!("echo" => Echo::new);
//! ```
//!
//! Authors write plain, safe Rust: JSON in, JSON out, and a [`TaskError`] that
//! says whether a retry may help. [`export_plugin!`] writes the stable-ABI glue
//! and catches panics inside the plugin, so a panicking task becomes an error
//! result instead of aborting the host.
//!
//! # Modules
//! - [`ffi`]: the types that cross the library boundary (abi_stable).
//! - [`host`]: loading a library and running its tasks, used by Daisy itself.
//!
//! # Versioning
//! The interface version is this crate's version ([`INTERFACE_VERSION`]).
//! The rules, which the tests hold Daisy to:
//!
//! - **Same major: loaded.** Daisy loads a library built against any minor of
//!   its own major version, older or newer. A library built against another
//!   major is refused with an error naming both versions.
//! - **A minor may only add.** The root module ([`ffi::PluginMod`]) and the
//!   task vtable ([`ffi::TaskBase`]) grow new fields and methods after their
//!   `#[sabi(last_prefix_field)]`; the attribute never moves, and existing
//!   fields, methods and types ([`ffi::FfiInput`], [`ffi::FfiError`],
//!   [`ffi::ErrorKind`]) never change. New input travels beside the old
//!   ([`ffi::FfiRunMore`], since 1.1).
//! - **An older minor keeps its layout in the host.** abi_stable refuses a
//!   library whose prefix types have fewer fields than the loader expects, so
//!   each older minor's root module and vtable stay here, frozen ([`ffi::v1_0`]),
//!   and [`host::Library::load`] picks the layout by the library's version. A
//!   1.0 plugin sees no run id and an empty context.
//! - **Anything else is a new major**: removing or changing a field, a new
//!   [`ffi::ErrorKind`] variant, another meaning for an existing field.
//!
//! abi_stable also checks the layout of every type that crosses the boundary
//! when a library is loaded, so a mismatched build is refused, never run.
//! The workspace keeps a plugin built against 1.0 (`plugins/testkit-old-minor`,
//! against a frozen copy of plugin-api 1.0.0) to prove the first rule.
//!
//! | version | added |
//! |---|---|
//! | 1.0 | tasks, typed errors with Retry-After, panics caught |
//! | 1.1 | [`Input::run_id`], [`Input::context`], typed configs with a JSON Schema ([`export_plugin!`]) |

pub mod ffi;
pub mod host;

use std::{fmt, time::Duration};

pub use schemars;
pub use serde_json::{self, Value, json};

/// The version of this interface, compiled into every plugin and into Daisy.
///
/// ```
/// let major = plugin_api::INTERFACE_VERSION.split('.').next();
/// assert_eq!(major, Some("1"));
/// ```
pub const INTERFACE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a task gets on each run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Input {
    /// The form's id (a UUID).
    pub form_id: String,
    /// The submission's id (a UUID), unique per submitted response.
    pub submission_id: String,
    /// The submitted response as JSON.
    pub submission: Value,
    /// 1 on the first run; asynchronous tasks count up on each retry.
    pub attempt: u32,
    /// The run's id (a UUID): the same on every attempt and on every
    /// redelivery of one asynchronous run, so it serves as an idempotency
    /// key at an outside API or in the plugin's own store. A synchronous run
    /// gets a new one per call. Empty from a Daisy older than plugin-api 1.1.
    pub run_id: String,
    /// Who submitted, and for whom: what the form backend passed along
    /// (empty when it passed nothing).
    pub context: Context,
}

/// The submission's context, as the form backend sent it with the
/// submission (`ProcessRequest.context`). Every field may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Context {
    /// The organisation the form belongs to.
    pub organisation_id: String,
    /// The form's owners, by email address.
    pub owner_emails: Vec<String>,
    /// Who submitted the response (an id or an email), when known.
    pub submitter: String,
    /// The submitter's locale (a BCP 47 tag such as `en-GB`).
    pub locale: String,
}

impl Context {
    /// A context; handy in plugin tests.
    ///
    /// ```
    /// let context = plugin_api::Context::new("org-1", ["owner@example.com"]);
    /// assert_eq!(context.owner_emails, ["owner@example.com"]);
    /// ```
    pub fn new(
        organisation_id: impl Into<String>,
        owner_emails: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Context {
            organisation_id: organisation_id.into(),
            owner_emails: owner_emails.into_iter().map(Into::into).collect(),
            ..Context::default()
        }
    }

    /// Whether the backend sent no context at all.
    pub fn is_empty(&self) -> bool {
        self == &Context::default()
    }
}

impl Input {
    /// The answers: the submission's `answers` object when it has one (as
    /// form backends usually send), else the submission itself; empty when
    /// the submission is not an object.
    ///
    /// ```
    /// use plugin_api::{Input, json};
    /// let input = Input::new("f", "s", json!({"answers": {"name": "Ada"}}), 1);
    /// assert_eq!(input.answers()["name"], "Ada");
    /// ```
    pub fn answers(&self) -> &serde_json::Map<String, Value> {
        static EMPTY: std::sync::OnceLock<serde_json::Map<String, Value>> =
            std::sync::OnceLock::new();
        self.submission["answers"]
            .as_object()
            .or_else(|| self.submission.as_object())
            .unwrap_or_else(|| EMPTY.get_or_init(serde_json::Map::new))
    }

    /// An input, as Daisy builds it for each run (with no run id and an
    /// empty context); handy in plugin tests.
    ///
    /// ```
    /// use plugin_api::{Input, json};
    /// let input = Input::new("form", "submission", json!({}), 1);
    /// assert_eq!(input.attempt, 1);
    /// ```
    pub fn new(
        form_id: impl Into<String>,
        submission_id: impl Into<String>,
        submission: Value,
        attempt: u32,
    ) -> Self {
        Input {
            form_id: form_id.into(),
            submission_id: submission_id.into(),
            submission,
            attempt,
            run_id: String::new(),
            context: Context::default(),
        }
    }

    /// The same input with run id `run_id`.
    ///
    /// ```
    /// use plugin_api::{Input, json};
    /// let input = Input::new("f", "s", json!({}), 2).with_run_id("r-1");
    /// assert_eq!(input.run_id, "r-1");
    /// ```
    pub fn with_run_id(mut self, run_id: impl Into<String>) -> Self {
        self.run_id = run_id.into();
        self
    }

    /// The same input with context `context`.
    ///
    /// ```
    /// use plugin_api::{Context, Input, json};
    /// let input = Input::new("f", "s", json!({}), 1)
    ///     .with_context(Context::new("org", ["a@example.com"]));
    /// assert_eq!(input.context.organisation_id, "org");
    /// ```
    pub fn with_context(mut self, context: Context) -> Self {
        self.context = context;
        self
    }
}

/// A task: built once from its configuration, then run many times.
///
/// `run` is called from several threads at once, hence `Send + Sync`; keep
/// clients and caches in `self` behind the usual synchronisation. It may
/// block (plugin code runs on threads of its own), but must answer within
/// the task's `timeout_ms`: a run past it fails as timed out, and a plugin
/// host whose run overstays is recycled.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use plugin_api::{Input, Task, TaskError, Value, json};
///
/// /// Counts the runs it served.
/// struct Counter(AtomicU64);
///
/// impl Task for Counter {
///     fn run(&self, _input: &Input) -> Result<Value, TaskError> {
///         Ok(json!({ "served": self.0.fetch_add(1, Ordering::Relaxed) + 1 }))
///     }
/// }
///
/// let task = Counter(AtomicU64::new(0));
/// let input = Input::new("form", "submission", json!({}), 1);
/// assert_eq!(task.run(&input).unwrap()["served"], 1);
/// ```
pub trait Task: Send + Sync + 'static {
    /// Runs the task on one submission.
    fn run(&self, input: &Input) -> Result<Value, TaskError>;
}

/// Why a task failed, and whether running it again may help.
///
/// A synchronous task's error goes back in the `Process` response. An
/// asynchronous run that fails retryably is run again with backoff (no
/// sooner than its Retry-After) until its `max_attempts`; a permanent error
/// ends it `DEAD` at once.
///
/// ```
/// use std::time::Duration;
/// use plugin_api::TaskError;
///
/// let busy = TaskError::retryable("the API answered 503")
///     .with_retry_after(Duration::from_secs(30));
/// assert!(busy.is_retryable());
/// let bad = TaskError::permanent("no phone number in the answers");
/// assert!(!bad.is_retryable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A failure that a later attempt may not hit (a timeout, a 503, a rate limit).
    ///
    /// ```
    /// assert!(plugin_api::TaskError::retryable("timed out").is_retryable());
    /// ```
    pub fn retryable(message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retryable: true,
            retry_after: None,
        }
    }

    /// The earliest time a retry makes sense, e.g. an API's `Retry-After`.
    /// The worker takes it as a throttle, not a failure: it waits this long
    /// plus some jitter (capped by its `--retry-max-ms`) without using one of
    /// the run's attempts, until the run has waited `--max-throttled-ms` in
    /// all; past that it waits at least this long (or its own backoff, if
    /// longer) and the attempt counts.
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = plugin_api::TaskError::retryable("429").with_retry_after(Duration::from_secs(5));
    /// assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    /// ```
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The wait asked for by [`TaskError::with_retry_after`].
    ///
    /// ```
    /// assert_eq!(plugin_api::TaskError::retryable("x").retry_after(), None);
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// A failure that will happen again on the same input (bad config, a rule broken).
    ///
    /// ```
    /// assert!(!plugin_api::TaskError::permanent("rule 7 broken").is_retryable());
    /// ```
    pub fn permanent(message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retryable: false,
            retry_after: None,
        }
    }

    /// What went wrong.
    ///
    /// ```
    /// assert_eq!(plugin_api::TaskError::permanent("bad").message(), "bad");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a retry may help.
    ///
    /// ```
    /// assert!(plugin_api::TaskError::retryable("503").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

/// Parses an HTTP `Retry-After` value: delay-seconds or an HTTP date.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(plugin_api::parse_retry_after("120"), Some(Duration::from_secs(120)));
/// assert_eq!(plugin_api::parse_retry_after("soon"), None);
/// ```
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    value
        .parse::<u64>()
        .map(Duration::from_secs)
        .ok()
        .or_else(|| {
            httpdate::parse_http_date(value)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .ok()
        })
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

/// A secret from Daisy's `--secrets-dir`, as a config field.
///
/// A task's stored config names it, `{"secret": "twilio_token"}`; Daisy reads
/// the file of that name when it creates the task and hands the plugin its
/// contents, so the value is never in the `tasks` table, in `daisy task
/// list`, or in the plugin's environment. It prints as `Secret(<redacted>)`.
///
/// ```
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Config {
///     /// The gateway's auth token.
///     auth_token: plugin_api::Secret,
/// }
/// // What the plugin receives once Daisy has resolved the name:
/// let config: Config = plugin_api::decode_config(plugin_api::json!({"auth_token": "s3cr3t"})).unwrap();
/// assert_eq!(config.auth_token.expose(), "s3cr3t");
/// assert_eq!(format!("{:?}", config.auth_token), "Secret(<redacted>)");
/// ```
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret's value; keep it out of messages and logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    /// The form a stored config takes: a reference by name.
    fn json_schema(_generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A secret from Daisy's --secrets-dir, by file name",
            "type": "object",
            "properties": {"secret": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}},
            "required": ["secret"],
            "additionalProperties": false,
        })
    }
}

/// Decodes a task's JSON config into its config type, naming the field at
/// fault when it does not fit: `rules: invalid type: integer `5`, expected a
/// sequence`. [`export_plugin!`] calls it before a typed constructor runs.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Config { rules: Vec<String> }
/// let err = plugin_api::decode_config::<Config>(plugin_api::json!({"rules": 5})).err().unwrap();
/// assert!(err.message().contains("rules"), "{err}");
/// ```
pub fn decode_config<C: serde::de::DeserializeOwned>(config: Value) -> Result<C, TaskError> {
    serde_path_to_error::deserialize(config).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            TaskError::permanent(format!("invalid config: {inner}"))
        } else {
            TaskError::permanent(format!("invalid config at `{path}`: {inner}"))
        }
    })
}

/// Exports the plugin's tasks: `export_plugin!("name" => constructor, ...)`.
///
/// Each constructor is a `fn(C) -> Result<T, TaskError>` where `T: Task`
/// and `C` is the task's config type: any type that is
/// `serde::Deserialize` and `schemars::JsonSchema`, or plain [`Value`] for
/// an untyped config. A typed config declares its JSON Schema, which `daisy
/// task attach` checks a config against before attaching it, and a config
/// that does not fit is refused naming the field at fault. Use the macro once
/// per crate, at the crate root. The names are what the `func` column of a
/// task row selects.
///
/// ```
/// use plugin_api::{Input, Task, TaskError, Value, json};
///
/// /// Greets in its configured language.
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Config {
///     /// The greeting.
///     greeting: String,
/// }
///
/// struct Greet(Config);
///
/// impl Task for Greet {
///     fn run(&self, _input: &Input) -> Result<Value, TaskError> {
///         Ok(json!({ "greeting": self.0.greeting }))
///     }
/// }
///
/// plugin_api::export_plugin!("greet" => |config: Config| Ok::<_, TaskError>(Greet(config)));
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($($name:literal => $ctor:expr),+ $(,)?) => {
        /// The library header Daisy looks up when it loads this plugin.
        #[doc(hidden)]
        // The symbol abi_stable's loader looks for; a unit test in plugin-api
        // checks it against `abi_stable::library::ROOT_MODULE_LOADER_NAME`.
        #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
        pub static __DAISY_PLUGIN_HEADER: $crate::ffi::__private::LibHeader = {
            extern "C" fn load_root_module() -> $crate::ffi::__private::RootModuleResult {
                $crate::ffi::__private::call_root_module_loader(|| {
                    $crate::ffi::__private::root_module(
                        env!("CARGO_PKG_NAME"),
                        env!("CARGO_PKG_VERSION"),
                        &[$($name),+],
                        new_task,
                        config_schema,
                    )
                })
            }
            extern "C" fn new_task(
                func: $crate::ffi::__private::RStr<'_>,
                config: $crate::ffi::__private::RStr<'_>,
            ) -> $crate::ffi::NewTaskResult {
                $crate::ffi::__private::new_task(func, config, |func, config| match func {
                    $($name => Some($crate::ffi::__private::construct(config, $ctor)),)+
                    _ => None,
                })
            }
            extern "C" fn config_schema(
                func: $crate::ffi::__private::RStr<'_>,
            ) -> $crate::ffi::__private::ROption<$crate::ffi::__private::RString> {
                $crate::ffi::__private::config_schema(func, |func| match func {
                    $($name => Some($crate::ffi::__private::schema_of(&$ctor)),)+
                    _ => None,
                })
            }
            $crate::ffi::__private::header(load_root_module)
        };
    };
}
