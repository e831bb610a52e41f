//! The proxy's side of "nothing lost": publishing accepted runs, the relay
//! that publishes whatever was not confirmed, and the run log writer.
//!
//! PostgreSQL is the source of truth. `Process` commits its runs first
//! ([`crate::registry::Registry::accept`]), answers, and publishes them in the
//! background ([`Outbox::publish_soon`]). Whatever is not confirmed by then
//! (a crash between commit and publish, a broker outage, a retry whose time
//! has come) is published by the relay, which locks due rows with
//! `FOR UPDATE SKIP LOCKED` so any number of proxies can run it side by side.
//! A run published twice is harmless: workers claim runs conditionally.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::Backoff,
    batch::Batcher,
    error::RegistryError,
    lifecycle::{Lifecycle, pause},
    queue::{Outgoing, Publisher},
    registry::{Acceptance, Accepted, Registry, Replay, SyncRun},
};

/// What accepting one submission came to: its runs, a refused replay, or
/// a database failure.
pub type AcceptResult = Result<Result<Vec<Accepted>, Replay>, Arc<RegistryError>>;

/// Group commit for the outbox: concurrent `Process` calls hand their
/// asynchronous runs to a few writers, each writing whatever has piled up
/// (up to 256 submissions) in one transaction.
///
/// One submission never sinks its batch: a batch that fails for any reason
/// but a transient one (see [`RegistryError::is_transient`]) is split in
/// halves and written again, down to the one submission that fails, which
/// alone gets the error.
#[derive(Debug, Clone)]
pub struct Acceptor {
    batcher: Batcher<Acceptance, AcceptResult>,
}

impl Acceptor {
    /// Starts `writers` writers on `life`; they stop when every `Acceptor`
    /// is dropped.
    pub fn start(
        registry: Registry,
        grace: Duration,
        writers: usize,
        life: &Lifecycle,
    ) -> Acceptor {
        let batcher = Batcher::start(
            life,
            "outbox writer",
            writers,
            256,
            move |requests: Vec<Acceptance>| {
                let registry = registry.clone();
                async move {
                    tokio::task::spawn_blocking(move || accept_split(&registry, &requests, grace))
                        .await
                        .expect("outbox write panicked")
                }
            },
        );
        Acceptor { batcher }
    }

    /// Commits one submission's runs (with whatever else is waiting).
    pub async fn accept(&self, request: Acceptance) -> AcceptResult {
        self.batcher
            .call(request)
            .await
            .expect("outbox writers live as long as the service and always reply")
    }
}

/// Writes `requests` as one batch, or, if that fails deterministically, as
/// two halves, recursively: only the request that cannot be written fails.
fn accept_split(
    registry: &Registry,
    requests: &[Acceptance],
    grace: Duration,
) -> Vec<AcceptResult> {
    match registry.accept(requests, grace) {
        Ok(accepted) => accepted.into_iter().map(Ok).collect(),
        Err(err) if requests.len() > 1 && !err.is_transient() => {
            tracing::warn!(error = %err, batch = requests.len(), "an outbox batch failed; splitting it to find the submission at fault");
            let (left, right) = requests.split_at(requests.len() / 2);
            let mut results = accept_split(registry, left, grace);
            results.extend(accept_split(registry, right, grace));
            results
        }
        Err(err) => {
            if !err.is_transient() {
                tracing::error!(error = %err, submission.id = %requests[0].submission, "a submission could not be accepted");
            }
            vec![Err(Arc::new(err)); requests.len()]
        }
    }
}

/// Publishes runs and records what the broker confirmed.
#[derive(Debug, Clone)]
pub struct Outbox {
    registry: Registry,
    publisher: Arc<Publisher>,
    fresh: mpsc::Sender<Outgoing>,
}

impl Outbox {
    /// An outbox over `registry` publishing through `publisher`; starts the
    /// task that publishes freshly accepted runs on `life` (it ends when
    /// every `Outbox` is dropped).
    pub fn new(registry: Registry, publisher: Arc<Publisher>, life: &Lifecycle) -> Outbox {
        let (fresh, rx) = mpsc::channel(65_536);
        life.spawn(
            "fresh publisher",
            publish_fresh(registry.clone(), publisher.clone(), rx),
        );
        Outbox {
            registry,
            publisher,
            fresh,
        }
    }

    /// Publishes freshly accepted runs in the background, batched with those
    /// of concurrent calls; the relay covers any that are not confirmed (or
    /// that find the backlog full).
    pub fn publish_soon(&self, runs: Vec<Outgoing>) {
        for run in runs {
            if self.fresh.try_send(run).is_err() {
                break;
            }
        }
    }

    /// Publishes due, unconfirmed runs every `interval` until `shutdown`;
    /// every `stale / 4` it also re-queues runs quiet for longer than `stale`.
    pub async fn relay(
        self,
        interval: Duration,
        stale: Duration,
        batch: i64,
        shutdown: CancellationToken,
    ) {
        let mut failing = false;
        let mut next_sweep = tokio::time::Instant::now() + stale / 4;
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep = tokio::time::Instant::now() + stale / 4;
                let registry = self.registry.clone();
                match tokio::task::spawn_blocking(move || registry.requeue_stale(stale)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(requeued)) => tracing::warn!(requeued, "re-queued runs that went quiet"),
                    Ok(Err(err)) => tracing::debug!(error = %err, "stale-run sweep failed"),
                    Err(join) => tracing::error!(error = %join, "stale-run sweep panicked"),
                }
            }
            let (registry, publisher) = (self.registry.clone(), self.publisher.clone());
            let runtime = tokio::runtime::Handle::current();
            let pass = tokio::task::spawn_blocking(move || {
                registry.relay_batch(batch, |due| {
                    let due: Vec<Outgoing> = due
                        .iter()
                        .map(|(run, trace)| Outgoing {
                            run: *run,
                            traceparent: trace.as_deref().map(Into::into),
                        })
                        .collect();
                    runtime.block_on(publisher.publish(&due))
                })
            })
            .await;
            let full = match pass {
                Ok(Ok(published)) => {
                    if published > 0 {
                        tracing::info!(published, "relay published runs");
                        ::metrics::counter!(crate::metrics::RUNS_PUBLISHED, "path" => "relay")
                            .increment(published as u64);
                    }
                    failing = false;
                    published as i64 >= batch
                }
                Ok(Err(err)) => {
                    if !failing {
                        tracing::warn!(error = %err, "relay cannot reach the database; retrying");
                    }
                    failing = true;
                    false
                }
                Err(join) => {
                    tracing::error!(error = %join, "relay pass panicked");
                    false
                }
            };
            if !full {
                pause(&shutdown, interval).await;
            }
        }
    }
}

/// Publishes what `publish_soon` queued, whatever piled up at a time, and
/// records the confirmed ones in one statement per batch.
async fn publish_fresh(
    registry: Registry,
    publisher: Arc<Publisher>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut batch = Vec::with_capacity(1000);
    while rx.recv_many(&mut batch, 1000).await > 0 {
        let confirmed = publisher.publish(&batch).await;
        batch.clear();
        if confirmed.is_empty() {
            continue;
        }
        ::metrics::counter!(crate::metrics::RUNS_PUBLISHED, "path" => "accept")
            .increment(confirmed.len() as u64);
        let registry = registry.clone();
        let stored = tokio::task::spawn_blocking(move || registry.mark_published(&confirmed)).await;
        if let Ok(Err(err)) = stored {
            // Harmless: the relay publishes them again after the grace period.
            tracing::warn!(error = %err, "recording published runs failed");
        }
    }
}

/// Records finished synchronous runs behind the response, in batches.
///
/// The writer never wedges on one record: a batch that fails for any
/// reason but a transient one is split until the records that cannot be
/// stored stand alone; those are dropped, each with an error log line, and
/// counted ([`RunLog::dropped`]). Transient failures (the database away)
/// keep the batch and retry it with backoff.
///
/// The backlog is bounded in bytes, not records (one task's output may be
/// a megabyte, another's a few bytes). Overflow policy: while the backlog is
/// full (the database has been away for long), new records are dropped,
/// counted, and logged (the first, then every thousandth); calls are never
/// delayed for the log.
#[derive(Debug, Clone)]
pub struct RunLog {
    tx: mpsc::UnboundedSender<(SyncRun, usize)>,
    backlog: Arc<Backlog>,
}

/// The run log's backlog accounting, shared by callers and the writer.
#[derive(Debug)]
struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    capacity: usize,
    dropped: AtomicU64,
}

impl Backlog {
    fn drop_one(&self, run: &SyncRun, why: &str) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped % 1000 == 0 {
            tracing::error!(run.id = %run.id, task.name = %run.task_name, dropped, "{why}; a synchronous run goes unrecorded");
        }
    }
}

/// Roughly what a record costs held in memory and written.
fn record_bytes(run: &SyncRun) -> usize {
    let output = run
        .output
        .as_ref()
        .map_or(0, |o| serde_json::to_vec(o).map_or(0, |v| v.len()));
    256 + run.task_name.len() + run.last_error.as_ref().map_or(0, String::len) + output
}

impl RunLog {
    /// Starts the writer on `life`; it holds up to `capacity_bytes` of
    /// records while the database is away and stops once every `RunLog` is
    /// dropped and the backlog is written.
    pub fn start(
        registry: Registry,
        capacity_bytes: usize,
        life: &Lifecycle,
    ) -> (RunLog, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog {
            bytes: std::sync::atomic::AtomicUsize::new(0),
            capacity: capacity_bytes,
            dropped: AtomicU64::new(0),
        });
        (
            RunLog {
                tx,
                backlog: backlog.clone(),
            },
            life.spawn("run log writer", write(registry, rx, backlog)),
        )
    }

    /// Queues records without waiting; while the backlog is full they are
    /// dropped (see the overflow policy above).
    pub fn record(&self, runs: Vec<SyncRun>) {
        for run in runs {
            let size = record_bytes(&run);
            let held = self.backlog.bytes.fetch_add(size, Ordering::AcqRel);
            if held + size > self.backlog.capacity {
                self.backlog.bytes.fetch_sub(size, Ordering::AcqRel);
                self.backlog.drop_one(&run, "run log backlog full");
                continue;
            }
            if self.tx.send((run, size)).is_err() {
                self.backlog.bytes.fetch_sub(size, Ordering::AcqRel);
            }
        }
    }

    /// Bytes of records waiting to be written.
    pub fn backlog_bytes(&self) -> usize {
        self.backlog.bytes.load(Ordering::Acquire)
    }

    /// How many records were dropped: refused by the database, or over the backlog.
    pub fn dropped(&self) -> u64 {
        self.backlog.dropped.load(Ordering::Relaxed)
    }
}

async fn write(
    registry: Registry,
    mut rx: mpsc::UnboundedReceiver<(SyncRun, usize)>,
    backlog: Arc<Backlog>,
) {
    let mut received = Vec::with_capacity(1000);
    let mut backoff = Backoff::reconnect();
    // Whatever piled up during the previous write goes in the next one.
    while rx.recv_many(&mut received, 1000).await > 0 {
        let bytes: usize = received.iter().map(|(_, size)| size).sum();
        let mut batch: Vec<SyncRun> = received.drain(..).map(|(run, _)| run).collect();
        loop {
            let (registry, runs, log) = (
                registry.clone(),
                std::mem::take(&mut batch),
                backlog.clone(),
            );
            let written =
                tokio::task::spawn_blocking(move || record_split(&registry, runs, &log)).await;
            match written {
                Ok(None) => {
                    backoff.reset();
                    break;
                }
                Ok(Some((err, runs))) => {
                    tracing::warn!(error = %err, pending = runs.len(), "writing the run log failed; retrying");
                    batch = runs;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(join) => {
                    tracing::error!(error = %join, "run log writer panicked; batch lost");
                    break;
                }
            }
        }
        backlog.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Writes `runs`, splitting a batch that fails deterministically so that
/// only the records the database refuses are dropped. Returns what is left
/// to write, with the error, when the database is away.
fn record_split(
    registry: &Registry,
    mut runs: Vec<SyncRun>,
    backlog: &Backlog,
) -> Option<(RegistryError, Vec<SyncRun>)> {
    let err = match registry.record_sync_runs(&runs) {
        Ok(()) => return None,
        Err(err) if err.is_transient() => return Some((err, runs)),
        Err(err) => err,
    };
    if runs.len() == 1 {
        backlog.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %err,
            run.id = %runs[0].id,
            task.name = %runs[0].task_name,
            submission.id = %runs[0].submission_id,
            "the database refused a run log record; it is dropped"
        );
        return None;
    }
    let right = runs.split_off(runs.len() / 2);
    if let Some((err, mut left)) = record_split(registry, runs, backlog) {
        left.extend(right);
        return Some((err, left));
    }
    record_split(registry, right, backlog)
}
