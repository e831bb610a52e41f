//! `daisy plugin`: list and show the libraries in the plugins directory
//! (read in a plugin host, never in this process), and start a new plugin.

use std::{path::Path, time::Duration};

use anyhow::Context;
use proxy::{DbConfig, plugins::validate_name, registry::Registry};

use super::cli_plugins;
use crate::cli::{DbArgs, PluginCommand};

/// `daisy plugin`.
pub(crate) fn run(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::List { plugins, db } => list(&plugins.plugins_dir, &db),
        PluginCommand::New {
            name,
            dir,
            plugin_api,
        } => {
            let module = proxy::scaffold::new_plugin(&name, &dir, plugin_api.as_deref())?;
            println!(
                "created plugin '{name}' in {}: `cargo build --release` there, then drop target/release/{} into the plugins directory and attach its task `greet` (module {module})",
                dir.display(),
                proxy::plugins::library_file_name(&module)
            );
            Ok(())
        }
        PluginCommand::Show { module, plugins } => show(&plugins.plugins_dir, &module),
    }
}

fn show(dir: &Path, module: &str) -> anyhow::Result<()> {
    validate_name("module", module)?;
    let (runtime, plugins) = cli_plugins(dir)?;
    let inspected = runtime.block_on(plugins.inspect(module));
    plugins.shutdown();
    let info = inspected?;
    println!(
        "{module}: {} {} (plugin-api {}), sha256 {}",
        info.name, info.version, info.api_version, info.sha256
    );
    for task in &info.tasks {
        match info.schemas.get(task) {
            Some(schema) => println!(
                "\ntask {task}: config schema\n{}",
                serde_json::to_string_pretty(schema)?
            ),
            None => println!("\ntask {task}: no config schema declared (any JSON is accepted)"),
        }
    }
    Ok(())
}

fn list(dir: &Path, db: &DbArgs) -> anyhow::Result<()> {
    let (runtime, plugins) = cli_plugins(dir)?;
    let registry = Registry::new(&DbConfig {
        timeout: Duration::from_millis(db.db_timeout_ms.min(2000)),
        ..db.config()
    });
    let mut database_down = false;
    let modules = plugins
        .modules()
        .with_context(|| format!("reading plugins directory '{}'", dir.display()))?;
    if modules.is_empty() {
        println!("no plugin libraries in '{}'", dir.display());
    }
    for module in modules {
        match runtime.block_on(plugins.inspect(&module)) {
            Ok(info) => {
                println!(
                    "{module}\tok\t{} {} (plugin-api {})\ttasks: {}",
                    info.name,
                    info.version,
                    info.api_version,
                    info.tasks.join(", ")
                );
                if database_down {
                    continue;
                }
                match registry.quarantines(&module) {
                    Ok(quarantines) => {
                        for q in quarantines.iter().filter(|q| q.sha256 == info.sha256) {
                            println!(
                                "{module}\tquarantined\t{}: after {} crashes of its plugin host, until {} or a new build",
                                q.func,
                                q.crashes,
                                q.until.format("%Y-%m-%d %H:%M:%S UTC")
                            );
                        }
                    }
                    Err(err) => {
                        database_down = true;
                        eprintln!("warning: quarantines not shown: {err}");
                    }
                }
            }
            Err(err) => println!("{module}\terror\t{err}"),
        }
    }
    plugins.shutdown();
    Ok(())
}
