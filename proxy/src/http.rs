//! The operations listener (`--http-addr`) of `daisy serve` and `daisy
//! worker`: `/metrics` (Prometheus), `/healthz` (the process is up) and
//! `/readyz` (it can do its work: the database answers, the broker is
//! connected), and on serve the web console ([`crate::console`]) at `/`.
//!
//! Off unless asked for, and loopback only: it has no TLS or
//! authentication of its own, so an address beyond loopback is refused.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::lifecycle::Lifecycle;

/// A readiness check: `Err` says what is not ready.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    ready: Check,
}

/// Starts the operations listener on `addr` (refused beyond loopback):
/// `/metrics`, `/healthz`, `/readyz` answered by `ready`, and `console`
/// when given, served on `life` until it stops. Installs the metrics
/// recorder first, so an address or recorder problem fails the start.
pub async fn start(
    addr: SocketAddr,
    ready: Check,
    console: Option<Router>,
    life: &Lifecycle,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--http-addr {addr} is beyond loopback, and the operations listener has no TLS or authentication: bind it to 127.0.0.1 or [::1] (put a TLS-terminating proxy in front to reach it from elsewhere)"
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --http-addr {addr}: {e}"))?;
    crate::metrics::install()?;
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { ready });
    let app = match console {
        Some(console) => ops.merge(console),
        None => ops,
    };
    // The bound address: with port 0 the system picked one.
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "operations listener up: /metrics, /healthz, /readyz");
    let shutdown = life.token().clone().cancelled_owned();
    life.spawn("operations listener", async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %err, "the operations listener stopped");
        }
    });
    Ok(())
}

async fn metrics() -> impl IntoResponse {
    let body = crate::metrics::install()
        .map(|handle| handle.render())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    match (ops.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
