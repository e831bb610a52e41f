//! [`consume`]: a consumer loop with manual acks and a prefetch that
//! reconnects with backoff and drains in-flight deliveries on shutdown.
//! Its tasks (the deliveries' handlers, the acker, the connection watcher)
//! run on the caller's [`Lifecycle`].

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments, Channel};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

use super::{QueueConfig, QueueError, op, topology::open};
use crate::{
    backoff::Backoff,
    lifecycle::{Lifecycle, pause},
};

/// Consumers of this process that are up (for readiness).
static CONSUMERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many of this process's consumers are connected and consuming.
pub fn consumers_up() -> usize {
    CONSUMERS.load(std::sync::atomic::Ordering::Relaxed)
}

/// One message handed to a consumer's handler.
pub struct Delivery {
    /// The run id in the body, if it parses.
    pub run_id: Option<Uuid>,
    /// Whether RabbitMQ delivered it before (to a consumer that went away).
    pub redelivered: bool,
    /// The raw body, for logs.
    pub body: String,
    /// The trace the run belongs to (the message's `traceparent` header).
    pub traceparent: Option<String>,
    tag: u64,
    acks: Arc<Acks>,
}

impl Delivery {
    /// Acknowledges the message: it is done with. Acks are sent in the
    /// background, many per frame; one lost with the connection only means
    /// a redelivery, which the run's claim makes harmless.
    pub fn ack(&self) {
        ::metrics::counter!(crate::metrics::WORKER_ACKS).increment(1);
        self.acks.done(self.tag);
    }
}

/// The acks of one consumer channel, sent in batches: whatever completed
/// while the previous batch was written goes out together, as one
/// `multiple` ack for the longest completed run of tags from the oldest
/// unacked delivery, plus single acks for completions beyond a gap (a slow
/// run never holds back its neighbours' acks, and so the prefetch window).
struct Acks {
    state: Mutex<AckState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct AckState {
    /// Delivered and not yet acked.
    outstanding: std::collections::BTreeSet<u64>,
    /// Completed and not yet acked.
    done: Vec<u64>,
    closed: bool,
}

impl Acks {
    fn new() -> Self {
        Acks {
            state: Mutex::new(AckState::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn delivered(&self, tag: u64) {
        self.state
            .lock()
            .expect("ack lock poisoned")
            .outstanding
            .insert(tag);
    }

    fn done(&self, tag: u64) {
        self.state.lock().expect("ack lock poisoned").done.push(tag);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.state.lock().expect("ack lock poisoned").closed = true;
        self.wake.notify_one();
    }

    /// Which acks to send now: `(tag, multiple)` pairs.
    fn take(&self) -> (Vec<(u64, bool)>, bool) {
        let mut state = self.state.lock().expect("ack lock poisoned");
        let mut done = std::mem::take(&mut state.done);
        done.sort_unstable();
        let mut acks = Vec::new();
        // The prefix of outstanding tags that all completed: one multiple ack.
        let mut prefix_end = None;
        let mut i = 0;
        while let Some(&oldest) = state.outstanding.first() {
            if done.get(i) != Some(&oldest) {
                break;
            }
            state.outstanding.pop_first();
            prefix_end = Some(oldest);
            i += 1;
        }
        if let Some(tag) = prefix_end {
            acks.push((tag, true));
        }
        for &tag in &done[i..] {
            if state.outstanding.remove(&tag) {
                acks.push((tag, false));
            }
        }
        (acks, state.closed)
    }

    /// Sends acks as deliveries complete, until closed and drained.
    async fn run(self: Arc<Self>, channel: Channel) {
        loop {
            self.wake.notified().await;
            let (acks, closed) = self.take();
            for (tag, multiple) in acks {
                if let Err(err) = channel
                    .basic_ack(BasicAckArguments::new(tag, multiple))
                    .await
                {
                    // The broker will redeliver; the claim makes that harmless.
                    tracing::warn!(error = %err, "ack failed");
                }
            }
            if closed {
                return;
            }
        }
    }
}

/// Consumes `queue` with manual acks and `prefetch` until `life` stops,
/// calling `handle` for each delivery (at most `prefetch` at once).
/// Reconnects with backoff. On shutdown it stops taking deliveries and waits
/// for the handlers in flight, which ack what they finished; the broker
/// requeues the rest when the connection closes.
pub async fn consume<F, Fut>(
    config: &QueueConfig,
    queue: &str,
    prefetch: u16,
    life: &Lifecycle,
    handle: F,
) where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let slots = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
    let shutdown = life.token();
    let mut backoff = Backoff::reconnect();
    while !shutdown.is_cancelled() {
        let session = async {
            let (connection, channel) = open(config, &format!("daisy-consumer-{queue}")).await?;
            channel
                .basic_qos(BasicQosArguments::new(0, prefetch.max(1), false))
                .await
                .map_err(op)?;
            let (_tag, rx) = channel
                .basic_consume_rx(
                    BasicConsumeArguments::new(queue, "")
                        .manual_ack(true)
                        .finish(),
                )
                .await
                .map_err(op)?;
            Ok::<_, QueueError>((connection, channel, rx))
        };
        let (connection, channel, mut rx) = match session.await {
            Ok(session) => session,
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, queue, retry_in_ms = delay.as_millis() as u64, "cannot consume from RabbitMQ");
                pause(shutdown, delay).await;
                continue;
            }
        };
        backoff.reset();
        tracing::info!(queue, "consuming");
        let connected = ::metrics::gauge!(crate::metrics::BROKER_CONNECTED, "role" => "consumer", "queue" => queue.to_owned());
        connected.set(1.0);
        CONSUMERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The receiver ends when the channel or connection closes.
        let io = connection.clone();
        let (lost_tx, mut lost) = oneshot::channel::<()>();
        let acks = Arc::new(Acks::new());
        let acker = life.spawn("acker", acks.clone().run(channel.clone()));
        let watcher = life.spawn("broker connection watcher", async move {
            io.listen_network_io_failure().await;
            let _ = lost_tx.send(());
        });
        loop {
            let message = tokio::select! {
                message = rx.recv() => message,
                _ = &mut lost => None,
                () = shutdown.cancelled() => None,
            };
            let Some(message) = message else { break };
            let (Some(deliver), Some(body)) = (message.deliver, message.content) else {
                continue;
            };
            let body = String::from_utf8_lossy(&body).into_owned();
            let traceparent = message
                .basic_properties
                .as_ref()
                .and_then(|p| p.headers())
                .and_then(|h| h.get(&amqprs::FieldName::try_from(crate::trace::TRACEPARENT).ok()?))
                .and_then(|v| match v {
                    amqprs::FieldValue::S(s) => Some(s.as_ref().clone()),
                    _ => None,
                });
            let delivery = Delivery {
                run_id: body.trim().parse().ok(),
                redelivered: deliver.redelivered(),
                body,
                traceparent,
                tag: deliver.delivery_tag(),
                acks: acks.clone(),
            };
            acks.delivered(delivery.tag);
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slots semaphore is never closed");
            let handle = handle.clone();
            life.spawn("delivery", async move {
                handle(delivery).await;
                drop(slot);
            });
        }
        // Let in-flight handlers finish (and ack) before the channel goes.
        let _all = slots
            .acquire_many(u32::from(prefetch.max(1)))
            .await
            .expect("the slots semaphore is never closed");
        drop(_all);
        acks.close();
        let _ = acker.await;
        connected.set(0.0);
        CONSUMERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !shutdown.is_cancelled() {
            tracing::warn!(queue, "lost the RabbitMQ consumer; reconnecting");
        }
        let _ = channel.close().await;
        let _ = connection.close().await;
        // Closing ends the watcher; a connection that never says so must not
        // hold up shutdown.
        watcher.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_cover_the_completed_prefix_at_once_and_never_wait_on_a_gap() {
        let acks = Acks::new();
        for tag in 1..=6 {
            acks.delivered(tag);
        }
        // 1, 2 and 4, 5 done; 3 still running.
        for tag in [2, 1, 5, 4] {
            acks.done(tag);
        }
        assert_eq!(
            acks.take(),
            (vec![(2, true), (4, false), (5, false)], false),
            "one multiple ack up to the gap, single acks beyond it"
        );
        acks.done(3);
        assert_eq!(acks.take(), (vec![(3, true)], false));
        acks.done(6);
        acks.close();
        assert_eq!(acks.take(), (vec![(6, true)], true), "nothing acked twice");
    }
}
