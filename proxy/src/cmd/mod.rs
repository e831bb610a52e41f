//! What each `daisy` command does, one module per command; `main.rs`
//! parses the command line and hands it to one of them. The helpers here are
//! shared by several commands.

pub(crate) mod key;
pub(crate) mod migrate;
pub(crate) mod plugin;
pub(crate) mod plugin_host;
pub(crate) mod process;
pub(crate) mod runs;
pub(crate) mod serve;
pub(crate) mod task;
pub(crate) mod worker;

use anyhow::Context;
use proxy::plugins::{HostConfig, Isolation, Plugins};

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing the work in flight");
}

/// Drops the runtime of `serve` or `worker` without waiting for what its
/// shutdown deadline already gave up on: a blocking call that never
/// returns (a hung in-process plugin, say) must not keep the process alive.
fn leave(runtime: tokio::runtime::Runtime) {
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
}

/// A plugin layer for the CLI's one-shot looks at the plugins directory
/// (libraries are read in a plugin host, never in the CLI's own process),
/// on a runtime of its own.
fn cli_plugins(dir: &std::path::Path) -> anyhow::Result<(tokio::runtime::Runtime, Plugins)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let program = std::env::current_exe().context("finding the daisy executable")?;
    let plugins = runtime
        .block_on(async { Plugins::new(dir, HostConfig::new(program), Isolation::Process) })
        .context("creating the plugin loader")?;
    Ok((runtime, plugins))
}
