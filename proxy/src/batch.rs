//! Group commit: concurrent callers hand their requests to a few writers,
//! each writing whatever has piled up (up to a limit) as one batch. Under
//! load this turns one database round trip per caller into one per batch,
//! and callers wait in line here instead of on an exhausted connection pool.

use std::{future::Future, sync::Arc};

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
    /// per request, in order. Answers it leaves out (a shorter vector, say
    /// on shutdown) reach their callers as `None`. The writers run on
    /// `life`, tracked as `name`.
    pub fn start<F, Fut>(
        life: &Lifecycle,
        name: &'static str,
        writers: usize,
        max: usize,
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
                    if rx.lock().await.recv_many(&mut batch, max).await == 0 {
                        return;
                    }
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
