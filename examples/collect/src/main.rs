//! Demo Collect backend; run it with `cargo run -p example-collect` (see `--help`).
//!
//! Serves forms and responses on its own PostgreSQL database, and sends every
//! stored response to Daisy through the post-submission layer.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use post_submission::{Credentials, DaisyClient, PostSubmission, Resend};

#[derive(Parser)]
#[command(
    name = "example-collect",
    about = "Demo Collect backend with Daisy post-submission tasks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "COLLECT_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// The backend's own PostgreSQL database (created tables on start).
    #[arg(
        long,
        env = "COLLECT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/collect",
        hide_env_values = true
    )]
    database_url: String,
    /// Daisy's gRPC address (`https://` for a Daisy served with TLS; the
    /// CA, client certificate and API key come from DAISY_CA_FILE,
    /// DAISY_CLIENT_CERT, DAISY_CLIENT_KEY and DAISY_API_KEY_FILE or
    /// DAISY_API_KEY).
    #[arg(long, env = "DAISY_SERVER", default_value = "http://127.0.0.1:50051")]
    daisy: String,
    /// How long a submit waits for Daisy before answering "pending", in milliseconds.
    #[arg(long, env = "COLLECT_DAISY_DEADLINE_MS", default_value_t = 2000)]
    deadline_ms: u64,
    /// How long a pending response waits before the resender sends it again, in seconds.
    #[arg(long, env = "COLLECT_RESEND_GRACE_SECS", default_value_t = 10)]
    resend_grace_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = args.database_url.clone();
    let pool = tokio::task::spawn_blocking(move || example_collect::connect_and_migrate(&url))
        .await?
        .context("opening the Collect database")?;
    let credentials = Credentials::from_env()?;
    tracing::info!(?credentials, "Daisy client credentials");
    let client = DaisyClient::connect_lazy_with(
        &args.daisy,
        Duration::from_millis(args.deadline_ms),
        &credentials,
    )?;
    let daisy = PostSubmission::new(client, example_collect::PgStore(pool.clone()));
    daisy.spawn_resender(Resend {
        grace: Duration::from_secs(args.resend_grace_secs),
        ..Resend::default()
    });
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    tracing::info!(addr = %args.addr, daisy = %args.daisy, "collect backend serving");
    axum::serve(listener, example_collect::app(pool, daisy))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
