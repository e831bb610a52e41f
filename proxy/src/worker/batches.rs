//! The worker's database writes: concurrent deliveries' claims and outcomes
//! go out in batches, and transient failures are retried with backoff.

use std::{future::Future, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::{BATCH, LINGER};
use crate::{
    backoff::Backoff,
    batch::Batcher,
    error::RegistryError,
    lifecycle::{Lifecycle, pause},
    registry::Registry,
};

/// Writes concurrent deliveries' requests in batches of up to [`BATCH`] with
/// `op` (one answer per request), one batch at a time, each gathered for
/// [`LINGER`] at least. Transient failures
/// are retried with [`with_db`]; any other failure splits the batch until the
/// request at fault stands alone, which is answered by `refused` instead, so
/// one bad request never holds up (or retries forever) the others. On
/// shutdown a batch that fails goes unanswered. The writers run on `life`
/// as `writers` and end when the last handle is dropped.
pub(super) fn db_batcher<Req, Resp>(
    registry: &Registry,
    life: &Lifecycle,
    writers: &'static str,
    what: &'static str,
    op: impl Fn(&Registry, &[Req]) -> Result<Vec<Resp>, RegistryError> + Send + Sync + 'static,
    refused: impl Fn(&Registry, &Req, RegistryError) -> Resp + Send + Sync + 'static,
) -> Batcher<Req, Resp>
where
    Req: Send + Sync + 'static,
    Resp: Send + 'static,
{
    let (registry, shutdown) = (registry.clone(), life.token().clone());
    let (op, refused) = (Arc::new(op), Arc::new(refused));
    Batcher::start(
        life,
        writers,
        1,
        BATCH,
        LINGER,
        move |requests: Vec<Req>| {
            let (registry, shutdown) = (registry.clone(), shutdown.clone());
            let (op, refused) = (op.clone(), refused.clone());
            let requests = Arc::new(requests);
            async move {
                let all = 0..requests.len();
                write_split(&registry, &shutdown, what, &op, &refused, &requests, all)
                    .await
                    .unwrap_or_default()
            }
        },
    )
}

/// Answers `requests[range]`, splitting on deterministic failures; `None`
/// on shutdown.
fn write_split<'a, Req, Resp, Op, Refuse>(
    registry: &'a Registry,
    shutdown: &'a CancellationToken,
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
pub(super) async fn with_db<T: Send + 'static>(
    registry: &Registry,
    shutdown: &CancellationToken,
    what: &'static str,
    op: impl Fn(&Registry) -> Result<T, RegistryError> + Send + Sync + 'static,
) -> Option<Result<T, RegistryError>> {
    let op = Arc::new(op);
    let mut backoff = Backoff::reconnect();
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
        if shutdown.is_cancelled() || !pause(shutdown, backoff.next_delay()).await {
            return None;
        }
    }
}
