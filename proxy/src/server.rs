//! Assembles and runs the gRPC server.
//!
//! Shutdown (see [`crate::lifecycle`]): the signal cancels the lifecycle's
//! token; the gRPC server stops accepting and drains the calls in flight,
//! the relay, statistics, retention and the operations listener stop, and
//! the writers (outbox, fresh publishes, run log) flush and end once the
//! service that feeds them is gone. All of it within `shutdown_grace`;
//! then the plugin hosts are stopped.

use std::{future::Future, sync::Arc, time::Duration};

use proto::v1::post_sub_proxy_server::PostSubProxyServer;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;

use anyhow::Context;

use crate::{
    Config,
    auth::{AuthMode, Keys},
    catalog::Catalog,
    executor::Executor,
    grpc::{Service, edge_statuses},
    lifecycle::{Lifecycle, pause},
    outbox::{Acceptor, Outbox},
    plugins::Plugins,
    queue::Publisher,
    registry::{Change, Registry},
    run_log::RunLog,
    security::tls_incoming,
};

/// The run log's backlog while the database is away (see [`RunLog`]).
const RUN_LOG_BACKLOG_BYTES: usize = 64 << 20;

/// Calls one connection may have open at once.
const MAX_STREAMS: u32 = 1024;
/// The longest a call may take before the server answers it with
/// `DEADLINE_EXCEEDED` (task timeouts are meant to be far shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves `PostSubProxy`, health and reflection on `listener` until
/// `shutdown` completes; then stops accepting and lets in-flight calls
/// finish (for up to `config.shutdown_grace`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let life = Lifecycle::new();
    // However `run` ends, nothing it started goes on unasked.
    let _stop_on_return = life.token().clone().drop_guard();
    life.stop_on(shutdown);
    let registry = Registry::new(&config.db);
    let plugins = Arc::new(Plugins::new(
        &config.plugins_dir,
        config.hosts.clone(),
        config.isolation,
    )?);
    let keys = match config.security.auth {
        AuthMode::Token => Some(Arc::new(
            Keys::load(registry.clone()).context("loading the API keys")?,
        )),
        AuthMode::None => None,
    };
    let catalog = Arc::new(Catalog::start(registry.clone(), &life, {
        let (plugins, keys) = (plugins.clone(), keys.clone());
        move |change| {
            if let Change::Form(form) = change {
                plugins.forget_form(form);
            }
            // A revoked key stops working within the listener's poll.
            if let (Change::Keys | Change::Reset, Some(keys)) = (change, &keys) {
                if let Err(err) = keys.reload() {
                    tracing::warn!(error = %err, "reloading the API keys failed; the last ones known stay in force");
                }
            }
        }
    }));
    plugins.record_quarantines_in(registry.clone());
    let executor = Executor::new(plugins.clone(), config.max_concurrent_tasks);
    let publisher = Arc::new(Publisher::new(config.queue.clone()));
    let outbox = Outbox::new(registry.clone(), publisher, config.outbox_grace, &life);
    let (run_log, _) = RunLog::start(registry.clone(), RUN_LOG_BACKLOG_BYTES, &life);
    life.spawn(
        "upkeep",
        upkeep(registry.clone(), config.retain, life.token().clone()),
    );
    if let Some(addr) = config.http_addr {
        let ready: crate::http::Check = {
            let registry = registry.clone();
            Arc::new(move || {
                let registry = registry.clone();
                Box::pin(async move { database_ready(registry).await })
            })
        };
        let console =
            crate::console::Console::new(registry.clone(), plugins.clone(), keys.clone())?.router();
        crate::http::start(addr, ready, Some(console), &life).await?;
        life.spawn(
            "run statistics",
            run_stats(registry.clone(), life.token().clone()),
        );
    }
    life.spawn(
        "relay",
        outbox.clone().relay(
            config.relay_interval,
            config.stale_after,
            500,
            life.token().clone(),
        ),
    );
    // A quarter of the pool writes the outbox (2 of the default 8); the rest
    // serves lookups, the run log, the publish marks and the relay. Fewer
    // writers make larger batches, so fewer commits: at c=32 with one sync
    // and one async task, 2 writers accepted 4,379/s and 4 writers 3,746/s
    // (means of four full runs each, alternating).
    let writers = (config.db.pool_size as usize / 4).max(1);
    let acceptor = Acceptor::start(registry.clone(), config.outbox_grace, writers, &life);
    // GetRuns reads through a small pool of its own: a burst of reads never
    // takes the connections the writers need, nor the other way round.
    let reads = Registry::new(&crate::DbConfig {
        pool_size: 2,
        ..config.db.clone()
    });
    let service = PostSubProxyServer::new(
        Service::new(
            catalog,
            executor,
            reads,
            acceptor,
            outbox,
            run_log,
            config.sync_run_log,
        )
        .with_limits(config.limits)
        .with_keys_if(keys),
    )
    .max_decoding_message_size(config.max_request_bytes);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PostSubProxyServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    tracing::info!(
        addr = %listener.local_addr()?,
        plugins.dir = %config.plugins_dir.display(),
        tls = config.security.tls.is_some(),
        mutual_tls = config.security.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        auth = ?config.security.auth,
        reflection = config.security.reflection,
        "daisy serving"
    );
    let (reflection, reflection_alpha) = if config.security.reflection {
        (Some(reflection), Some(reflection_alpha))
    } else {
        (None, None)
    };
    let router = tonic::transport::Server::builder()
        // Bounds per connection, so that one client cannot hold the server:
        // streams (calls) at once, calls being served at once, and how long
        // one call may take (longer than any task's timeout should be).
        .max_concurrent_streams(Some(MAX_STREAMS))
        .concurrency_limit_per_connection(MAX_STREAMS as usize)
        .timeout(REQUEST_TIMEOUT)
        // Dead peers are found and their connections closed.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .layer(tower::util::MapResponseLayer::new(edge_statuses))
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_optional_service(reflection_alpha)
        .add_service(service);
    // Served on the lifecycle: it stops accepting on the token and ends
    // once the calls in flight are answered, dropping the service, and with
    // it the senders of the outbox and run log writers, which then flush.
    let drained = life.token().clone().cancelled_owned();
    let mut server = match &config.security.tls {
        Some(tls) => {
            let acceptor = tls.acceptor().context("configuring TLS")?;
            life.spawn(
                "gRPC server",
                router.serve_with_incoming_shutdown(tls_incoming(listener, acceptor), drained),
            )
        }
        None => {
            // Small HTTP/2 frames go out at once: without TCP_NODELAY, Nagle's
            // algorithm and the client's delayed ACK add ~40 ms to some responses.
            let incoming = TcpListenerStream::new(listener).map(|stream| {
                let stream = stream?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            });
            life.spawn(
                "gRPC server",
                router.serve_with_incoming_shutdown(incoming, drained),
            )
        }
    };
    let failed = tokio::select! {
        () = life.token().cancelled() => None,
        served = &mut server => Some(served),
    };
    let stopped = life.shut_down(config.shutdown_grace).await;
    plugins.shutdown();
    tracing::info!(clean = stopped, "daisy stopped");
    match failed {
        Some(served) => Ok(served??),
        // Calls still in flight past the deadline are left unanswered.
        None if !server.is_finished() => Ok(()),
        None => Ok(server.await??),
    }
}

/// Ready when the database answers within a second.
pub async fn database_ready(registry: Registry) -> Result<(), String> {
    let ping = tokio::task::spawn_blocking(move || registry.ping());
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(err))) => Err(format!("the database: {err}")),
        Ok(Err(_)) | Err(_) => Err("the database did not answer within 1 s".into()),
    }
}

/// Sets the run and outbox gauges from [`Registry::run_stats`] every 15 s
/// until `stop`.
async fn run_stats(registry: Registry, stop: CancellationToken) {
    use crate::metrics::{OUTBOX_OLDEST_AGE, OUTBOX_UNPUBLISHED, RUNS_BY_STATE};
    while !stop.is_cancelled() {
        let reading = registry.clone();
        match tokio::task::spawn_blocking(move || reading.run_stats()).await {
            Ok(Ok(stats)) => {
                for (state, runs) in stats.by_state {
                    ::metrics::gauge!(RUNS_BY_STATE, "state" => state).set(runs as f64);
                }
                ::metrics::gauge!(OUTBOX_UNPUBLISHED).set(stats.unpublished as f64);
                let age = stats
                    .oldest_unpublished
                    .and_then(|at| (chrono::Utc::now() - at).to_std().ok())
                    .unwrap_or_default();
                ::metrics::gauge!(OUTBOX_OLDEST_AGE).set(age.as_secs_f64());
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "reading run statistics failed"),
            Err(join) => tracing::error!(error = %join, "reading run statistics panicked"),
        }
        pause(&stop, Duration::from_secs(15)).await;
    }
}

/// Days of run log partitions made ahead of today: a stopped upkeep (or
/// one whose locks keep timing out) has two days before rows start going
/// to the default partition.
const SYNC_RUN_DAYS_AHEAD: u32 = 2;

/// Every ten minutes until `stop` (and at once): makes the run log's day
/// partitions for today and the next [`SYNC_RUN_DAYS_AHEAD`] days, then,
/// with `retain`, deletes what is finished and older, in batches of 1,000
/// (a pause between them).
async fn upkeep(registry: Registry, retain: Option<Duration>, stop: CancellationToken) {
    let retain = retain.map(|r| chrono::Duration::from_std(r).unwrap_or(chrono::Duration::MAX));
    while !stop.is_cancelled() {
        let today = chrono::Utc::now().date_naive();
        let prepare = registry.clone();
        // A failed round (the database away, a lock not granted) is tried
        // again sooner.
        let mut wait = Duration::from_secs(600);
        match tokio::task::spawn_blocking(move || {
            prepare.prepare_sync_run_days(today, SYNC_RUN_DAYS_AHEAD)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(days)) => tracing::info!(days, "run log: day partitions created"),
            Ok(Err(err)) => {
                wait = Duration::from_secs(30);
                tracing::warn!(error = %err, "run log: creating day partitions failed; trying again in 30 s")
            }
            Err(join) => {
                tracing::error!(error = %join, "run log: creating day partitions panicked")
            }
        }
        while let Some(retain) = retain {
            let cutoff = chrono::Utc::now()
                .checked_sub_signed(retain)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            let registry = registry.clone();
            match tokio::task::spawn_blocking(move || registry.prune(cutoff, 1000)).await {
                Ok(Ok(pruned)) if pruned.is_empty() => break,
                Ok(Ok(pruned)) => {
                    tracing::info!(
                        runs = pruned.runs,
                        submissions = pruned.submissions,
                        days = pruned.days,
                        "retention: deleted finished runs"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "retention: pruning failed; trying again later");
                    break;
                }
                Err(join) => {
                    tracing::error!(error = %join, "retention: pruning panicked");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
        pause(&stop, wait).await;
    }
}
