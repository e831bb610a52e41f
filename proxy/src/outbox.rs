//! The proxy's side of "nothing lost": accepting submissions, publishing
//! their runs, and the relay that publishes whatever was not confirmed.
//!
//! PostgreSQL is the source of truth. `Process` commits its runs first
//! ([`crate::registry::Registry::accept`]), answers, and publishes them in the
//! background ([`Outbox::publish_soon`]). Whatever is not confirmed by then
//! (a crash between commit and publish, a broker outage, a retry whose time
//! has come) is published by the relay, which locks due rows with
//! `FOR UPDATE SKIP LOCKED` so any number of proxies can run it side by side.
//! A run published twice is harmless: workers claim runs conditionally.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    batch::Batcher,
    error::RegistryError,
    lifecycle::{Lifecycle, pause},
    queue::{Outgoing, Publisher},
    registry::{Acceptance, Accepted, Registry, Replay},
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
            Duration::ZERO,
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
    /// every `Outbox` is dropped). The broker's confirmations are recorded
    /// half-way through `grace`, the time the relay leaves new runs to the
    /// accepting proxy.
    pub fn new(
        registry: Registry,
        publisher: Arc<Publisher>,
        grace: Duration,
        life: &Lifecycle,
    ) -> Outbox {
        let (fresh, rx) = mpsc::channel(65_536);
        life.spawn(
            "fresh publisher",
            publish_fresh(registry.clone(), publisher.clone(), rx, grace / 2),
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

/// At most this many confirmed runs wait for their publish mark; past it the
/// oldest are marked at once.
const MAX_UNMARKED: usize = 262_144;

/// Publishes what `publish_soon` queued, whatever piled up at a time, and
/// records the confirmed ones `mark_after` later, in one statement per
/// pass: by then a worker has claimed almost every run, and the mark skips
/// claimed runs, so in the normal case it writes no row at all. Only runs
/// still waiting in the queue (a backlog) get marked, which keeps the relay
/// from publishing them again once their grace period ends. A proxy that
/// stops before marking leaves the relay to publish them a second time,
/// which workers' conditional claims make harmless.
async fn publish_fresh(
    registry: Registry,
    publisher: Arc<Publisher>,
    mut rx: mpsc::Receiver<Outgoing>,
    mark_after: Duration,
) {
    let mut batch = Vec::with_capacity(1000);
    let mut unmarked: VecDeque<(tokio::time::Instant, Vec<Uuid>)> = VecDeque::new();
    let mut held = 0;
    loop {
        let next_mark = unmarked.front().map(|(at, _)| *at);
        tokio::select! {
            received = rx.recv_many(&mut batch, 1000) => {
                if received == 0 {
                    break;
                }
                let confirmed = publisher.publish(&batch).await;
                batch.clear();
                if confirmed.is_empty() {
                    continue;
                }
                ::metrics::counter!(crate::metrics::RUNS_PUBLISHED, "path" => "accept")
                    .increment(confirmed.len() as u64);
                held += confirmed.len();
                unmarked.push_back((tokio::time::Instant::now() + mark_after, confirmed));
                if held > MAX_UNMARKED {
                    let (_, oldest) = unmarked.pop_front().expect("held counts what is queued");
                    held -= oldest.len();
                    mark(&registry, oldest).await;
                }
            }
            () = tokio::time::sleep_until(next_mark.unwrap_or_else(tokio::time::Instant::now)), if next_mark.is_some() => {
                let now = tokio::time::Instant::now();
                let mut due = Vec::new();
                while unmarked.front().is_some_and(|(at, _)| *at <= now) {
                    let (_, runs) = unmarked.pop_front().expect("checked above");
                    held -= runs.len();
                    due.extend(runs);
                }
                mark(&registry, due).await;
            }
        }
    }
    // Stopping: mark what is left now rather than leave it to the relay.
    mark(
        &registry,
        unmarked.into_iter().flat_map(|(_, runs)| runs).collect(),
    )
    .await;
}

/// Records that the broker confirmed `runs` (those no worker claimed yet).
async fn mark(registry: &Registry, runs: Vec<Uuid>) {
    if runs.is_empty() {
        return;
    }
    let registry = registry.clone();
    let stored = tokio::task::spawn_blocking(move || registry.mark_published(&runs)).await;
    if let Ok(Err(err)) = stored {
        // Harmless: the relay publishes them again after the grace period.
        tracing::warn!(error = %err, "recording published runs failed");
    }
}
