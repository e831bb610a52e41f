//! `daisy`: serve the PostSubProxy gRPC service, run migrations, attach tasks
//! to forms and inspect plugins. Every flag also reads a `DAISY_*` variable.
//!
//! This file only parses the command line ([`cli`]), sets up tracing and
//! hands the command to its module in [`cmd`]; what Daisy does lives in the
//! `proxy` library.

mod cli;
mod cmd;

use clap::Parser;
use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::cli::{Cli, Command};

/// glibc gives each thread that allocates its own malloc arena, up to eight
/// per core, and an arena keeps what it once held. With 64 blocking threads
/// that is most of `daisy serve`'s resident memory (BENCHMARKS.md: peak RSS
/// 59.5 MiB with the default, 42.5-52.8 MiB with two, on 2 cores;
/// throughput within noise). One arena per core (at least two),
/// unless `MALLOC_ARENA_MAX` says otherwise.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() {
    cap_malloc_arenas();
    let code = match try_main() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // libpq's OpenSSL registers an atexit cleanup that crashes the process
    // when a connection-pool thread is still in a TLS handshake at exit.
    // Everything is flushed and shut down by now, so leave without atexit.
    // SAFETY: `_exit` ends the process; no Rust code runs after it.
    unsafe { libc::_exit(code) }
}

fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::PluginHost {
        library,
        module,
        threads,
        memory_mib,
    } = cli.command
    {
        cmd::plugin_host::run(library, module, threads, memory_mib);
    }
    // The server logs what it does; one-shot commands only what went wrong.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Worker(_) => "info,tower=warn,h2=warn,amqprs=warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match cli.log_format {
        cli::LogFormat::Json => logs.json().boxed(),
        // No escape codes in a file or a pipe.
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    let service = match cli.command {
        Command::Serve(_) => Some("daisy-serve"),
        Command::Worker(_) => Some("daisy-worker"),
        _ => None,
    };
    let traces = match (&cli.otlp_endpoint, service) {
        (Some(endpoint), Some(service)) => Some(proxy::trace::otlp_layer(endpoint, service)?),
        _ => None,
    };
    // RUST_LOG picks the log lines; the exported spans are Daisy's own,
    // whatever it says.
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(|layer| {
            layer.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("proxy", tracing::Level::INFO),
            )
        }))
        .init();
    let done = run(cli.command);
    proxy::trace::shutdown();
    done
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::PluginHost { .. } => unreachable!("handled before logging starts"),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Runs(command) => cmd::runs::run(command),
        Command::Migrate { db } => cmd::migrate::run(&db),
        Command::Task(command) => cmd::task::run(command),
        Command::Key(command) => cmd::key::run(command),
        Command::Plugin(command) => cmd::plugin::run(command),
        Command::Process {
            server,
            form,
            submission_id,
            submission,
        } => cmd::process::run(&server, form, submission_id, &submission),
    }
}
