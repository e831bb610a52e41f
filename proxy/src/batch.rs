//! Group commit: concurrent callers hand their requests to a few writers,
//! each writing whatever has piled up (up to a limit) as one batch. Under
//! load this turns one database round trip per caller into one per batch,
//! and callers wait in line here instead of on an exhausted connection pool.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::lifecycle::Lifecycle;

type Reply<Resp> = oneshot::Sender<Resp>;

/// A handle to the writers; they stop when every handle is dropped (not on
/// the shutdown signal: what callers handed them is written first).
pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<(Req, Reply<Resp>)>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Batcher<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts `writers` writers, each taking up to `max` waiting requests
    /// at a time and answering them with `write`, which returns one answer
    /// per request, in order. With a `linger`, a writer that finds fewer
    /// than `max` waiting lets more gather for that long before it writes
    /// (while it lingers, the other writers wait their turn to collect):
    /// fewer, larger batches for callers that can wait. Answers `write`
    /// leaves out (a shorter vector, say on shutdown) reach their callers as
    /// `None`. The writers run on `life`, tracked as `name`.
    pub fn start<F, Fut>(
        life: &Lifecycle,
        name: &'static str,
        writers: usize,
        max: usize,
        linger: Duration,
        write: F,
    ) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<(Req, Reply<Resp>)>(4096);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let (rx, write) = (rx.clone(), write.clone());
            life.spawn(name, async move {
                let mut batch = Vec::with_capacity(max);
                loop {
                    let mut waiting = rx.lock().await;
                    if waiting.recv_many(&mut batch, max).await == 0 {
                        return;
                    }
                    gather_more(&mut batch, max, linger, || waiting.try_recv().ok()).await;
                    drop(waiting);
                    let (requests, replies): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut batch).into_iter().unzip();
                    for (reply, answer) in replies.into_iter().zip(write(requests).await) {
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Batcher { tx }
    }

    /// Hands `request` to the writers and waits for its answer; `None` if
    /// the writers stopped or left it unanswered.
    pub async fn call(&self, request: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((request, reply)).await.ok()?;
        answer.await.ok()
    }
}

/// Lets a batch that has begun (and holds fewer than `max`) gather for
/// `linger`, then adds what came meanwhile, from `next`, up to `max`. No
/// wait with a zero `linger` or a full batch.
pub(crate) async fn gather_more<T>(
    batch: &mut Vec<T>,
    max: usize,
    linger: Duration,
    mut next: impl FnMut() -> Option<T>,
) {
    if linger.is_zero() || batch.len() >= max {
        return;
    }
    tokio::time::sleep(linger).await;
    while batch.len() < max {
        match next() {
            Some(item) => batch.push(item),
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Sends three requests 10 ms apart through one writer with `linger`
    /// and returns the sizes of the batches it wrote.
    async fn batch_sizes(linger: Duration) -> Vec<usize> {
        let life = Lifecycle::new();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::start(
            &life,
            "test writer",
            1,
            8,
            linger,
            move |requests: Vec<u32>| {
                seen.lock().expect("sizes").push(requests.len());
                async move { requests }
            },
        );
        let calls: Vec<_> = (0..3)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(n))).await;
                    assert_eq!(
                        batcher.call(n).await,
                        Some(n),
                        "each caller gets its own answer"
                    );
                })
            })
            .collect();
        for call in calls {
            call.await.expect("a caller");
        }
        sizes.lock().expect("sizes").clone()
    }

    #[tokio::test]
    async fn a_lingering_writer_gathers_requests_that_come_soon_after() {
        assert_eq!(batch_sizes(Duration::from_millis(200)).await, vec![3]);
        let alone = batch_sizes(Duration::ZERO).await;
        assert_eq!(alone.iter().sum::<usize>(), 3);
        assert!(
            alone.len() > 1,
            "without a linger the first request goes alone: {alone:?}"
        );
    }
}
