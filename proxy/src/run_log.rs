//! The synchronous run log's writer: finished synchronous runs are recorded
//! behind the response, never in its way.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

use crate::{
    backoff::Backoff,
    batch::gather_more,
    error::RegistryError,
    lifecycle::Lifecycle,
    registry::{Registry, SyncRun},
};

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
    bytes: AtomicUsize,
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
    256 + run.task_name.len()
        + run.last_error.as_ref().map_or(0, String::len)
        + run.output.as_ref().map_or(0, String::len)
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
            bytes: AtomicUsize::new(0),
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

/// The most records one batch writes.
const BATCH_RECORDS: usize = 1000;

/// How long the writer lets records gather once one has come, so that a
/// busy serve writes one transaction (one WAL flush) per this interval and
/// not one per record or two: the log is behind the response, and a
/// record is at most this much later in it.
const BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

async fn write(
    registry: Registry,
    mut rx: mpsc::UnboundedReceiver<(SyncRun, usize)>,
    backlog: Arc<Backlog>,
) {
    let mut received = Vec::with_capacity(BATCH_RECORDS);
    let mut backoff = Backoff::reconnect();
    // Whatever piled up during the previous write and the linger goes in
    // the next one.
    while rx.recv_many(&mut received, BATCH_RECORDS).await > 0 {
        gather_more(&mut received, BATCH_RECORDS, BATCH_LINGER, || {
            rx.try_recv().ok()
        })
        .await;
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
