//! `daisy worker`: executes asynchronous runs from RabbitMQ.
//!
//! For each delivery: claim the run in PostgreSQL with a conditional update
//! (no row means another delivery already handled it: ack and skip), run the
//! task through the same plugin loader and executor as the proxy, store the
//! outcome, then ack. Claims and outcomes of the deliveries in flight are
//! written in batches (one statement each), so a worker's database round
//! trips do not grow with its throughput. A crash anywhere before the ack
//! makes RabbitMQ redeliver, and the claim accepts a redelivered run that was left
//! `running`, so the run completes on another worker. Database errors are
//! retried with backoff before the ack, so nothing is lost while PostgreSQL
//! is away. A second consumer drains the dead-letter queue.
//!
//! Shutdown (see [`crate::lifecycle`]): the consumers stop taking
//! deliveries; runs executing finish and are acked, their leases kept until
//! then; prefetched deliveries not yet claimed are handed back unacked.
//! Whatever has not finished within `shutdown_grace` is left: the broker
//! redelivers it and its lease expires.
//!
//! - `batches`: the batched, retried database writes;
//! - `execute`: one delivery, from claim to outcome, and dead letters;
//! - `leases`: extending the leases of the runs in flight.

mod batches;
mod execute;
mod leases;

pub use execute::{retry_delay, throttle_delay};

use std::{future::Future, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use self::{
    batches::db_batcher,
    execute::{handle, handle_dead_letter},
    leases::keep_leases,
};
use crate::{
    batch::Batcher,
    catalog::Catalog,
    executor::Executor,
    lifecycle::Lifecycle,
    plugins::Plugins,
    queue::{self, QueueConfig},
    registry::{ClaimRequest, Claimed, DbConfig, Finish, Registry},
};

/// Everything `daisy worker` needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The run log's database.
    pub db: DbConfig,
    /// Where runs are queued.
    pub queue: QueueConfig,
    /// Where plugin libraries live.
    pub plugins_dir: std::path::PathBuf,
    /// How plugin hosts are run.
    pub hosts: crate::plugins::HostConfig,
    /// Where tasks that do not say run their plugin code.
    pub isolation: crate::plugins::Isolation,
    /// Unacknowledged deliveries held at once.
    pub prefetch: u16,
    /// Runs executed at once.
    pub max_concurrent_tasks: usize,
    /// First retry delay; doubles per attempt (±25% jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long in all a run may wait on APIs' Retry-After without those
    /// waits using its attempts; past it, a throttled execution counts.
    pub max_throttled: Duration,
    /// This worker's name in the attempt log.
    pub name: String,
    /// Crashes of its plugin host a run may be in flight for before it is dead.
    pub max_crashes: u32,
    /// How long a claim holds a run without being extended; the worker
    /// extends the leases of the runs it executes every third of it.
    pub lease: Duration,
    /// Where the operations listener (metrics, health) listens, if at all.
    pub http_addr: Option<std::net::SocketAddr>,
    /// How long shutdown waits for the runs in flight to finish.
    pub shutdown_grace: Duration,
}

/// Runs claimed or finished per database statement, at most.
const BATCH: usize = 256;

/// How long the claim writer and the finish writer (one each) let requests
/// gather before they write a batch smaller than [`BATCH`]. With two
/// writers each and no wait, a busy worker wrote about four runs per
/// statement, one commit and WAL flush each, and the database's CPU bounded
/// the drain; an asynchronous run can wait two milliseconds. Quick drains
/// of 30,000 runs, three pairs: 2 workers 3,115/s -> 4,373/s, 1 worker
/// 3,046/s -> 3,337/s (see BENCHMARKS.md).
const LINGER: Duration = Duration::from_millis(2);

/// Runs whose plugin-host crashes a worker remembers at once.
const MAX_CRASH_COUNTS: usize = 10_000;

struct Context {
    registry: Registry,
    /// One per run executing; taken before the claim, so a run is `running`
    /// only while it really executes (a prefetched delivery waiting its
    /// turn is not, and is not blamed if a neighbour kills the worker).
    executing: Arc<tokio::sync::Semaphore>,
    claims: Batcher<ClaimRequest, Option<Claimed>>,
    finishes: Batcher<(Claimed, Finish), ()>,
    catalog: Catalog,
    executor: Executor,
    /// How many plugin-host crashes each run was in flight for (this
    /// worker's count; bounded, forgotten when the run finishes).
    crashes: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, u32>>,
    /// The runs this worker executes (run, claim token), whose leases it extends.
    held: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, uuid::Uuid>>,
    config: WorkerConfig,
    /// The worker's stop signal.
    shutdown: CancellationToken,
}

/// Runs the worker until `shutdown` completes, then finishes the runs in
/// flight (for up to `shutdown_grace`) and returns.
pub async fn run(
    config: WorkerConfig,
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
    let catalog = Catalog::start(registry.clone(), &life, {
        let plugins = plugins.clone();
        move |change| {
            if let crate::registry::Change::Form(form) = change {
                plugins.forget_form(form);
            }
        }
    });
    plugins.record_quarantines_in(registry.clone());
    let executor = Executor::new(plugins.clone(), config.max_concurrent_tasks.max(1));
    let lease = config.lease;
    // A claim the database refuses is answered "nothing to claim": the
    // message is acked, and the run (still queued) is logged above.
    let claims = db_batcher(
        &registry,
        &life,
        "claim writer",
        "claim",
        move |r, requests| r.claim(requests, lease),
        |_, _, _| None,
    );
    let worker = config.name.clone();
    let fallback_worker = worker.clone();
    // An outcome the database refuses (an output it cannot store, say) is
    // stored as a dead run saying so; the message is acked either way.
    let finishes = db_batcher(
        &registry,
        &life,
        "finish writer",
        "finish",
        move |r, finished| {
            r.finish(&worker, finished)
                .map(|()| vec![(); finished.len()])
        },
        move |r, (claimed, _), err| {
            let why =
                std::error::Error::source(&err).map_or_else(|| err.to_string(), |s| s.to_string());
            let dead = Finish::Dead {
                error: format!(
                    "the task's outcome could not be stored: the database refused it ({why})"
                ),
            };
            if let Err(err) = r.finish(&fallback_worker, &[(claimed.clone(), dead)]) {
                tracing::error!(run.id = %claimed.run_id, error = %err, "storing that an outcome could not be stored failed too");
            }
        },
    );
    let ctx = Arc::new(Context {
        registry,
        executing: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_tasks.max(1),
        )),
        claims,
        finishes,
        catalog,
        executor,
        crashes: std::sync::Mutex::default(),
        held: std::sync::Mutex::default(),
        config: config.clone(),
        shutdown: life.token().clone(),
    });
    if let Some(addr) = config.http_addr {
        let registry = ctx.registry.clone();
        let ready: crate::http::Check = Arc::new(move || {
            let registry = registry.clone();
            Box::pin(async move {
                crate::server::database_ready(registry).await?;
                if queue::consumers_up() == 0 {
                    return Err("not consuming from RabbitMQ".into());
                }
                Ok(())
            })
        });
        crate::http::start(addr, ready, None, &life).await?;
    }
    tracing::info!(worker = %config.name, queue = %config.queue.queue, "worker started");
    life.spawn(
        "lease keeper",
        keep_leases(ctx.clone(), life.token().clone()),
    );
    life.spawn("dead-letter consumer", {
        let (ctx, inner) = (ctx.clone(), life.clone());
        let (queue, dead) = (config.queue.clone(), config.queue.dead_letter_queue());
        async move {
            queue::consume(&queue, &dead, 16, &inner, move |d| {
                handle_dead_letter(ctx.clone(), d)
            })
            .await
        }
    });
    life.spawn("consumer", {
        let inner = life.clone();
        let (queue, prefetch) = (config.queue.clone(), config.prefetch);
        async move {
            queue::consume(&queue, &queue.queue, prefetch, &inner, move |d| {
                handle(ctx.clone(), d)
            })
            .await
        }
    });
    // The consumers' handlers hold the context (and so the batch writers)
    // from here on: once the last delivery is done, the writers end too.
    life.token().cancelled().await;
    let stopped = life.shut_down(config.shutdown_grace).await;
    plugins.shutdown();
    tracing::info!(clean = stopped, "worker stopped");
    Ok(())
}
