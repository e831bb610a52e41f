//! `daisy task`: attach (checking the config against the plugin's schema),
//! list, rate-limit and detach the tasks of forms.

use anyhow::Context;
use proxy::{
    plugins::validate_name,
    registry::{NewTask, Registry},
};

use super::cli_plugins;
use crate::cli::{RateArgs, TaskCommand};

/// A rate group's name: 1 to 200 characters, no control characters.
fn check_rate_group(rate: &RateArgs) -> anyhow::Result<()> {
    if let Some(group) = &rate.rate_group {
        anyhow::ensure!(
            (1..=200).contains(&group.chars().count()) && !group.chars().any(char::is_control),
            "--rate-group must be 1 to 200 characters, without control characters"
        );
    }
    Ok(())
}

/// `daisy task`.
pub(crate) fn run(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Attach {
            form,
            name,
            module,
            func,
            is_async,
            config,
            timeout_ms,
            max_attempts,
            disabled,
            isolation,
            rate,
            force,
            db,
            plugins,
        } => {
            validate_name("module", &module)?;
            validate_name("func", &func)?;
            let config: serde_json::Value =
                serde_json::from_str(&config).context("--config is not valid JSON")?;
            anyhow::ensure!(timeout_ms > 0, "--timeout-ms must be positive");
            anyhow::ensure!(max_attempts > 0, "--max-attempts must be positive");
            refuse_paths(&config, "", force)?;
            check_plugin(&plugins.plugins_dir, &module, &func, &config, force)?;
            check_rate_group(&rate)?;
            let registry = Registry::new(&db.config());
            let task = registry
                .attach(&NewTask {
                    form_id: form,
                    name,
                    module,
                    func,
                    is_async,
                    config,
                    enabled: !disabled,
                    timeout_ms,
                    max_attempts,
                    isolation: isolation.map(|i| i.as_str().to_owned()),
                })
                .context("attaching the task")?;
            if rate.rate_limit.is_some() {
                registry
                    .set_rate_limit(task.id, rate.rate_limit, rate.rate_group.as_deref())
                    .context("setting the task's rate limit")?;
            }
            println!("{}", task.id);
            Ok(())
        }
        TaskCommand::Limit { id, rate, db } => {
            check_rate_group(&rate)?;
            let found = Registry::new(&db.config())
                .set_rate_limit(id, rate.rate_limit, rate.rate_group.as_deref())
                .context("setting the task's rate limit")?;
            anyhow::ensure!(found, "no task with id {id}");
            match (rate.rate_limit, rate.rate_group) {
                (None, _) => println!("task {id}: no rate limit"),
                (Some(n), None) => println!("task {id}: at most {n} runs a minute"),
                (Some(n), Some(group)) => {
                    println!("task {id}: at most {n} runs a minute, shared by rate group '{group}'")
                }
            }
            Ok(())
        }
        TaskCommand::List { form, db } => {
            let tasks = Registry::new(&db.config())
                .list(form)
                .context("listing tasks")?;
            println!(
                "{:<36}  {:<36}  {:<16}  {:<24}  {:<5}  {:<7}  {:<10}  {:<12}  CONFIG",
                "ID", "FORM", "NAME", "MODULE::FUNC", "MODE", "ENABLED", "ISOLATION", "RATE"
            );
            for t in tasks {
                let rate = match (t.rate_per_minute, &t.rate_group) {
                    (None, _) => "-".to_owned(),
                    (Some(n), None) => format!("{n}/min"),
                    (Some(n), Some(group)) => format!("{n}/min:{group}"),
                };
                println!(
                    "{:<36}  {:<36}  {:<16}  {:<24}  {:<5}  {:<7}  {:<10}  {:<12}  {}",
                    t.id,
                    t.form_id,
                    t.name,
                    format!("{}::{}", t.module, t.func),
                    if t.is_async { "async" } else { "sync" },
                    t.enabled,
                    t.isolation.as_deref().unwrap_or("default"),
                    rate,
                    t.config
                );
            }
            Ok(())
        }
        TaskCommand::Detach { id, db } => {
            let found = Registry::new(&db.config())
                .detach(id)
                .context("detaching the task")?;
            anyhow::ensure!(found, "no task with id {id}");
            println!("detached {id}");
            Ok(())
        }
    }
}

/// Refuses a config that names a file by absolute path (at `at`): configs
/// name secrets (`{"secret": "NAME"}`), never files. `force` only warns.
fn refuse_paths(config: &serde_json::Value, at: &str, force: bool) -> anyhow::Result<()> {
    match config {
        serde_json::Value::String(s) if s.starts_with('/') => {
            let why = format!(
                "--config names the file '{s}' at `{}`: task configs may not name files; put a secret in --secrets-dir and write {{\"secret\": \"NAME\"}}",
                if at.is_empty() { "/" } else { at }
            );
            if force {
                eprintln!("warning: {why} (attached anyway, --force)");
                Ok(())
            } else {
                anyhow::bail!("{why} (--force attaches anyway)")
            }
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| refuse_paths(v, &format!("{at}/{i}"), force)),
        serde_json::Value::Object(fields) => fields
            .iter()
            .try_for_each(|(k, v)| refuse_paths(v, &format!("{at}/{k}"), force)),
        _ => Ok(()),
    }
}

/// Checks `config` against the schema the task's plugin declares, when its
/// library is present and declares one: a config that does not fit is
/// refused (naming each field at fault) unless `force`. Only warns when the
/// plugin is not (yet) usable, since the library may be installed later.
fn check_plugin(
    dir: &std::path::Path,
    module: &str,
    func: &str,
    config: &serde_json::Value,
    force: bool,
) -> anyhow::Result<()> {
    let Ok((runtime, plugins)) = cli_plugins(dir) else {
        return Ok(());
    };
    let inspected = runtime.block_on(plugins.inspect(module));
    plugins.shutdown();
    let info = match inspected {
        Ok(info) => info,
        Err(err) => {
            eprintln!("warning: {err}; the task will fail until that is fixed");
            return Ok(());
        }
    };
    if !info.tasks.iter().any(|t| t == func) {
        eprintln!(
            "warning: plugin '{module}' has no task '{func}' (it exports: {})",
            info.tasks.join(", ")
        );
        return Ok(());
    }
    let Some(schema) = info.schemas.get(func) else {
        return Ok(());
    };
    let Err(problems) = proxy::plugins::schema::check_config(schema, config) else {
        return Ok(());
    };
    let problems = problems.join("\n  ");
    if force {
        eprintln!(
            "warning: --config does not fit the schema of {module}::{func} (attached anyway, --force):\n  {problems}"
        );
        return Ok(());
    }
    anyhow::bail!(
        "--config does not fit the schema of {module}::{func}:\n  {problems}\n(`daisy plugin show {module}` prints the schema; --force attaches anyway)"
    )
}
