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

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::Instrument;

use crate::{
    batch::Batcher,
    catalog::Catalog,
    error::RegistryError,
    executor::{Executor, Outcome, RunRef, Submission},
    plugins::Plugins,
    queue::{self, Backoff, Delivery, QueueConfig},
    registry::{ClaimRequest, Claimed, DbConfig, DeadLetter, Finish, Pace, Registry},
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
}

/// Runs claimed or finished per database statement, at most.
const BATCH: usize = 256;

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
    shutdown: watch::Receiver<bool>,
}

/// Runs the worker until `shutdown` completes, then finishes the runs in
/// flight and returns.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Registry::new(&config.db);
    let plugins = Arc::new(Plugins::new(
        &config.plugins_dir,
        config.hosts.clone(),
        config.isolation,
    )?);
    let catalog = Catalog::start(registry.clone(), {
        let plugins = plugins.clone();
        move |change| {
            if let crate::registry::Change::Form(form) = change {
                plugins.forget_form(form);
            }
        }
    });
    plugins.record_quarantines_in(registry.clone());
    let executor = Executor::new(plugins.clone(), config.max_concurrent_tasks.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let lease = config.lease;
    // A claim the database refuses is answered "nothing to claim": the
    // message is acked, and the run (still queued) is logged above.
    let claims = db_batcher(
        &registry,
        &stop_rx,
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
        &stop_rx,
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
        shutdown: stop_rx.clone(),
    });
    let ops = match config.http_addr {
        Some(addr) => {
            let listener = crate::http::bind(addr).await?;
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
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            };
            crate::metrics::install()?;
            Some(tokio::spawn(crate::http::serve(listener, ready, shutdown)))
        }
        None => None,
    };
    tracing::info!(worker = %config.name, queue = %config.queue.queue, "worker started");
    let leases = tokio::spawn(keep_leases(ctx.clone(), stop_rx.clone()));
    let dead_letters = tokio::spawn({
        let ctx = ctx.clone();
        let stop = stop_rx.clone();
        let queue = config.queue.dead_letter_queue();
        async move {
            queue::consume(&ctx.config.queue.clone(), &queue, 16, stop, move |d| {
                handle_dead_letter(ctx.clone(), d)
            })
            .await
        }
    });
    queue::consume(
        &config.queue,
        &config.queue.queue,
        config.prefetch,
        stop_rx,
        {
            let ctx = ctx.clone();
            move |d| handle(ctx.clone(), d)
        },
    )
    .await;
    let _ = dead_letters.await;
    let _ = leases.await;
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    plugins.shutdown();
    tracing::info!("worker stopped");
    Ok(())
}

/// Writes concurrent deliveries' requests in batches of up to [`BATCH`] with
/// `op` (one answer per request), two batches at a time. Transient failures
/// are retried with [`with_db`]; any other failure splits the batch until the
/// request at fault stands alone, which is answered by `refused` instead, so
/// one bad request never holds up (or retries forever) the others. On
/// shutdown the batch goes unanswered.
fn db_batcher<Req, Resp>(
    registry: &Registry,
    shutdown: &watch::Receiver<bool>,
    what: &'static str,
    op: impl Fn(&Registry, &[Req]) -> Result<Vec<Resp>, RegistryError> + Send + Sync + 'static,
    refused: impl Fn(&Registry, &Req, RegistryError) -> Resp + Send + Sync + 'static,
) -> Batcher<Req, Resp>
where
    Req: Send + Sync + 'static,
    Resp: Send + 'static,
{
    let (registry, shutdown) = (registry.clone(), shutdown.clone());
    let (op, refused) = (Arc::new(op), Arc::new(refused));
    Batcher::start(2, BATCH, move |requests: Vec<Req>| {
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        let (op, refused) = (op.clone(), refused.clone());
        let requests = Arc::new(requests);
        async move {
            let all = 0..requests.len();
            write_split(&registry, &shutdown, what, &op, &refused, &requests, all)
                .await
                .unwrap_or_default()
        }
    })
}

/// Answers `requests[range]`, splitting on deterministic failures; `None`
/// on shutdown.
fn write_split<'a, Req, Resp, Op, Refuse>(
    registry: &'a Registry,
    shutdown: &'a watch::Receiver<bool>,
    what: &'static str,
    op: &'a Arc<Op>,
    refused: &'a Arc<Refuse>,
    requests: &'a Arc<Vec<Req>>,
    range: std::ops::Range<usize>,
) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<Resp>>> + Send + 'a>>
where
    Req: Send + Sync + 'static,
    Resp: Send + 'static,
    Op: Fn(&Registry, &[Req]) -> Result<Vec<Resp>, RegistryError> + Send + Sync + 'static,
    Refuse: Fn(&Registry, &Req, RegistryError) -> Resp + Send + Sync + 'static,
{
    Box::pin(async move {
        let (batch_op, batch, part) = (op.clone(), requests.clone(), range.clone());
        match with_db(registry, shutdown, what, move |r| {
            batch_op(r, &batch[part.clone()])
        })
        .await?
        {
            Ok(answers) => Some(answers),
            Err(err) if range.len() == 1 => {
                let (refused, batch, at, registry) = (
                    refused.clone(),
                    requests.clone(),
                    range.start,
                    registry.clone(),
                );
                tracing::error!(error = %err, cause = ?std::error::Error::source(&err).map(|s| s.to_string()), operation = what, "the database refused one request of a batch");
                tokio::task::spawn_blocking(move || vec![refused(&registry, &batch[at], err)])
                    .await
                    .ok()
            }
            Err(err) => {
                tracing::warn!(error = %err, operation = what, batch = range.len(), "a batch failed; splitting it to find the request at fault");
                let middle = range.start + range.len() / 2;
                let mut answers = Vec::with_capacity(range.len());
                for part in [range.start..middle, middle..range.end] {
                    answers.extend(
                        write_split(registry, shutdown, what, op, refused, requests, part).await?,
                    );
                }
                Some(answers)
            }
        }
    })
}

/// Runs a registry operation, retrying transient failures (the database
/// away, a serialization conflict) with backoff until it succeeds; any
/// other failure is returned at once, since it would happen again. `None`
/// if the worker is shutting down meanwhile.
async fn with_db<T: Send + 'static>(
    registry: &Registry,
    shutdown: &watch::Receiver<bool>,
    what: &'static str,
    op: impl Fn(&Registry) -> Result<T, RegistryError> + Send + Sync + 'static,
) -> Option<Result<T, RegistryError>> {
    let op = Arc::new(op);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let registry = registry.clone();
        let op = op.clone();
        match tokio::task::spawn_blocking(move || op(&registry)).await {
            Ok(Ok(value)) => return Some(Ok(value)),
            Ok(Err(err)) if !err.is_transient() => return Some(Err(err)),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, operation = what, "database operation failed; retrying");
            }
            Err(join) => {
                tracing::error!(error = %join, operation = what, "database operation panicked")
            }
        }
        if *shutdown.borrow() {
            return None;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn handle(ctx: Arc<Context>, delivery: Delivery) {
    let Some(run_id) = delivery.run_id else {
        tracing::warn!(body = %delivery.body, "dropping a message that is not a run id");
        delivery.ack();
        return;
    };
    let span =
        tracing::info_span!("delivery", run.id = %run_id, redelivered = delivery.redelivered);
    let in_flight = ::metrics::gauge!(crate::metrics::WORKER_IN_FLIGHT);
    in_flight.increment(1.0);
    handle_run(ctx, delivery, run_id).instrument(span).await;
    in_flight.decrement(1.0);
}

async fn handle_run(ctx: Arc<Context>, delivery: Delivery, run_id: uuid::Uuid) {
    let _executing = ctx
        .executing
        .clone()
        .acquire_owned()
        .await
        .expect("the executing semaphore is never closed");
    let redelivered = delivery.redelivered;
    // One token per delivery: a claim retried after a lost answer is ours.
    let token = uuid::Uuid::new_v4();
    let request = ClaimRequest {
        run: run_id,
        redelivered,
        token,
    };
    let claimed = loop {
        let Some(claimed) = ctx.claims.call(request).await else {
            return; // shutting down: the broker redelivers
        };
        if let Some(claimed) = claimed {
            break claimed;
        }
        // A redelivered run may still be executing on a live worker (the
        // broker requeued its message when a connection dropped): wait
        // while its lease is alive, then take it over or find it finished.
        let live = redelivered
            && matches!(
                with_db(&ctx.registry, &ctx.shutdown, "lease check", move |r| {
                    r.held_by_live_lease(run_id)
                })
                .await,
                Some(Ok(true))
            );
        if !live || *ctx.shutdown.borrow() {
            tracing::debug!(run.id = %run_id, "already handled by another delivery");
            delivery.ack();
            return;
        }
        tokio::time::sleep(
            (ctx.config.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
        )
        .await;
    };
    ::metrics::counter!(crate::metrics::WORKER_CLAIMS).increment(1);
    ctx.held
        .lock()
        .expect("held runs poisoned")
        .insert(claimed.run_id, token);
    let finish = execute(&ctx, &claimed).await;
    let attempt = claimed.attempt;
    let finished = ctx.finishes.call((claimed, finish.clone())).await;
    ctx.held.lock().expect("held runs poisoned").remove(&run_id);
    if finished.is_none() {
        return;
    }
    let result = match &finish {
        Finish::Succeeded(_) => "succeeded",
        Finish::Retry { .. } => "retry",
        Finish::Dead { .. } => "dead",
        Finish::Throttled { .. } => "throttled",
        Finish::Paced { .. } => "paced",
    };
    ::metrics::counter!(crate::metrics::WORKER_FINISHES, "result" => result).increment(1);
    match &finish {
        Finish::Succeeded(_) => {
            tracing::info!(run.id = %run_id, attempt, "run succeeded")
        }
        Finish::Retry { error, after } => {
            tracing::warn!(run.id = %run_id, attempt, error = %error, retry_in_ms = after.as_millis() as u64, "run failed; will retry")
        }
        Finish::Dead { error } => {
            tracing::error!(run.id = %run_id, attempt, error = %error, "run is dead")
        }
        Finish::Throttled { error, after } => {
            tracing::info!(run.id = %run_id, attempt, error = %error, retry_in_ms = after.as_millis() as u64, "run throttled; will retry without using an attempt")
        }
        Finish::Paced { at } => {
            tracing::debug!(run.id = %run_id, start_at = %at, "run paced by its task's rate limit")
        }
    }
    delivery.ack();
}

/// Runs the claimed execution and decides what becomes of the run.
async fn execute(ctx: &Context, claimed: &Claimed) -> Finish {
    let form = claimed.form_id;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let tasks = loop {
        match ctx.catalog.tasks(form).await {
            Ok(tasks) => break tasks,
            Err(err) => {
                tracing::warn!(error = %err, "loading the form's tasks failed; retrying");
                if *ctx.shutdown.borrow() {
                    return Finish::Retry {
                        error: "worker shut down before running the task".into(),
                        after: Duration::ZERO,
                    };
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    let Some(task) = tasks.iter().find(|t| t.id == claimed.task_id).cloned() else {
        return Finish::Dead {
            error: format!(
                "task {} is no longer attached to form {form}",
                claimed.task_id
            ),
        };
    };
    if !task.enabled {
        return Finish::Dead {
            error: format!("task '{}' is disabled", task.name),
        };
    }
    if let Some(pace) = task.pace() {
        if let Some(later) = pace_run(ctx, claimed, pace).await {
            return later;
        }
    }
    let submission = Submission {
        form_id: form.to_string(),
        submission_id: claimed.submission_id.to_string(),
        json: claimed.payload.to_string().into(),
        context_json: claimed
            .context
            .as_ref()
            .map_or_else(String::new, |c| c.to_string())
            .into(),
    };
    let run = RunRef {
        id: claimed.run_id,
        attempt: u32::try_from(claimed.attempt).unwrap_or(1),
    };
    let result = ctx.executor.run(task, submission, run).await;
    let exhausted = claimed.attempt >= claimed.max_attempts;
    let crashes = {
        let mut counts = ctx.crashes.lock().expect("crash counts poisoned");
        // Only crashes this run's task likely caused count against it; a
        // neighbour in flight is retried as usual.
        let crashed = matches!(result.outcome, Outcome::Crashed { suspect: true, .. });
        let count = if crashed {
            if counts.len() >= MAX_CRASH_COUNTS {
                // Bounded: forget an arbitrary run's count.
                if let Some(&any) = counts.keys().next() {
                    counts.remove(&any);
                }
            }
            let count = counts.entry(claimed.run_id).or_insert(0);
            *count += 1;
            *count
        } else {
            0
        };
        if !crashed || count >= ctx.config.max_crashes {
            counts.remove(&claimed.run_id);
        }
        count
    };
    let (error, retryable, asked) = match result.outcome {
        Outcome::Succeeded(output) => return Finish::Succeeded(output),
        Outcome::Crashed { error, .. } if crashes >= ctx.config.max_crashes.max(1) => {
            return Finish::Dead {
                error: format!("its plugin host crashed {crashes} times while running it: {error}"),
            };
        }
        Outcome::Crashed { error, .. } => (error, true, None),
        Outcome::Failed {
            error,
            retryable,
            retry_after,
        } => (error, retryable, retry_after),
        Outcome::TimedOut(error) => (error, true, None),
    };
    if let (true, Some(asked)) = (retryable, asked) {
        // The API asked to come back later: a throttle, not a failure of
        // the run. It waits (with jitter, so throttled runs do not all come
        // back at once) without using an attempt, up to --max-throttled-ms.
        let after = throttle_delay(asked).min(ctx.config.retry_max);
        if claimed.throttled + after <= ctx.config.max_throttled {
            return Finish::Throttled {
                error: format!("throttled, retrying in {} ms: {error}", after.as_millis()),
                after,
            };
        }
    }
    if !retryable {
        Finish::Dead { error }
    } else if exhausted {
        Finish::Dead {
            error: format!("gave up after {} attempts: {error}", claimed.attempt),
        }
    } else {
        // Our backoff, or longer when the plugin passed on a Retry-After.
        let backoff = retry_delay(&ctx.config, claimed.attempt);
        // Clamped: a plugin's Retry-After never postpones a run beyond
        // --retry-max-ms.
        Finish::Retry {
            error,
            after: asked
                .map_or(backoff, |asked| asked.max(backoff))
                .min(ctx.config.retry_max),
        }
    }
}

/// How close to its start time a paced run may be started.
const SLOT_SLACK: Duration = Duration::from_millis(50);

/// Takes the run's start time from its task's rate limit (`pace`): `None`
/// when it may start now, else [`Finish::Paced`] with the start time it
/// reserved. A run coming back to a slot it holds starts at once, unless the
/// slot is long past (the workers were away meanwhile): starting every such
/// run at once would burst, so it reserves a new one.
async fn pace_run(ctx: &Context, claimed: &Claimed, pace: Pace) -> Option<Finish> {
    let now = chrono::Utc::now();
    let tolerance = pace.interval.max(Duration::from_secs(5));
    let holds = claimed.slot_at.is_some_and(|at| {
        at <= now + SLOT_SLACK && (now - at).to_std().is_ok_and(|late| late <= tolerance)
    });
    if holds {
        return None;
    }
    match with_db(&ctx.registry, &ctx.shutdown, "rate limit", move |r| {
        r.reserve_slot(&pace)
    })
    .await
    {
        Some(Ok(at)) if at <= now + SLOT_SLACK => None,
        Some(Ok(at)) => Some(Finish::Paced { at }),
        Some(Err(err)) => Some(Finish::Retry {
            error: format!("reserving a start time under the task's rate limit failed: {err}"),
            after: retry_delay(&ctx.config, claimed.attempt),
        }),
        // Shutting down: back to the queue as it was.
        None => Some(Finish::Throttled {
            error: "worker shut down before running the task".into(),
            after: Duration::ZERO,
        }),
    }
}

/// The wait after an API's Retry-After of `asked`: that, plus up to a
/// quarter of it (at least up to a second) at random.
pub fn throttle_delay(asked: Duration) -> Duration {
    let spread = (asked / 4).max(Duration::from_secs(1));
    asked + spread.mul_f64(fastrand::f64())
}

/// Extends the leases of the runs this worker executes, every third of a
/// lease, until shutdown. A failed extension is logged and tried at the next
/// tick; leases are long enough to survive a few.
async fn keep_leases(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let every = (ctx.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let held: Vec<(uuid::Uuid, uuid::Uuid)> = ctx
            .held
            .lock()
            .expect("held runs poisoned")
            .iter()
            .map(|(run, token)| (*run, *token))
            .collect();
        if held.is_empty() {
            continue;
        }
        let (registry, lease) = (ctx.registry.clone(), ctx.config.lease);
        match tokio::task::spawn_blocking(move || registry.extend_leases(&held, lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "extending run leases failed; retrying at the next tick")
            }
            Err(join) => tracing::error!(error = %join, "extending run leases panicked"),
        }
    }
}

/// The delay before attempt `attempt + 1`: base × 2^(attempt−1), capped, ±25%.
pub fn retry_delay(config: &WorkerConfig, attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    let delay = config
        .retry_base
        .saturating_mul(1 << exp)
        .min(config.retry_max);
    queue::jitter(delay)
}

async fn handle_dead_letter(ctx: Arc<Context>, delivery: Delivery) {
    let Some(run_id) = delivery.run_id else {
        delivery.ack();
        return;
    };
    let reason = format!(
        "delivery limit reached: the worker died {} times while running it (see the worker logs)",
        ctx.config.queue.delivery_limit
    );
    let result = match with_db(&ctx.registry, &ctx.shutdown, "dead letter", move |r| {
        r.dead_lettered(run_id, &reason)
    })
    .await
    {
        None => return,
        Some(Ok(result)) => result,
        Some(Err(err)) => {
            tracing::error!(run.id = %run_id, error = %err, "recording a dead letter failed; dropping the message");
            delivery.ack();
            return;
        }
    };
    match result {
        DeadLetter::MarkedDead => {
            tracing::error!(run.id = %run_id, "run killed its workers repeatedly; marked dead")
        }
        DeadLetter::Republish => {
            tracing::warn!(run.id = %run_id, "dead-lettered before it ran; handed back to the relay")
        }
        DeadLetter::Ignored => {}
    }
    delivery.ack();
}
