//! [`Publisher`]: persistent messages with publisher confirms. amqprs gives
//! no awaitable confirm (issue #156), so the publisher numbers its messages
//! the way the broker does (delivery tags from 1 per channel) and resolves
//! each one from the ack/nack callbacks, honouring `multiple`. A closed
//! channel or connection fails everything pending; the next publish
//! rebuilds connection, channel and topology, with backoff. No amqprs call
//! is wrapped in a timeout or `select!` (issue #196): only our own confirm
//! receivers are.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return,
    callbacks::{ChannelCallback, ConnectionCallback},
    channel::{BasicPublishArguments, Channel, ConfirmSelectArguments},
    connection::Connection,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{Outgoing, QueueConfig, QueueError, topology::open};
use crate::backoff::Backoff;

/// The confirms awaited on one channel.
#[derive(Default)]
struct Confirms {
    state: Mutex<ConfirmState>,
}

#[derive(Default)]
struct ConfirmState {
    /// The delivery tag the broker gives the next publish (from 1).
    next_tag: u64,
    waiting: BTreeMap<u64, oneshot::Sender<bool>>,
    closed: bool,
    /// Runs the broker returned as unroutable (publishes are `mandatory`).
    /// RabbitMQ sends a message's return before its confirm, so a confirmed
    /// run found here was not queued.
    returned: std::collections::HashSet<Uuid>,
}

impl Confirms {
    fn new() -> Self {
        Confirms {
            state: Mutex::new(ConfirmState {
                next_tag: 1,
                ..ConfirmState::default()
            }),
        }
    }

    /// Registers the next publish and returns its confirm receiver.
    fn register(&self) -> Option<oneshot::Receiver<bool>> {
        let mut state = self.state.lock().expect("confirm lock poisoned");
        if state.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let tag = state.next_tag;
        state.next_tag += 1;
        state.waiting.insert(tag, tx);
        Some(rx)
    }

    /// Resolves `tag`, or every tag up to it when `multiple`.
    fn resolve(&self, tag: u64, multiple: bool, ok: bool) {
        let mut state = self.state.lock().expect("confirm lock poisoned");
        if multiple {
            let rest = state.waiting.split_off(&(tag + 1));
            for (_, tx) in std::mem::replace(&mut state.waiting, rest) {
                let _ = tx.send(ok);
            }
        } else if let Some(tx) = state.waiting.remove(&tag) {
            let _ = tx.send(ok);
        }
    }

    /// The channel is gone: every pending publish fails.
    fn fail_all(&self) {
        let mut state = self.state.lock().expect("confirm lock poisoned");
        state.closed = true;
        state.waiting.clear(); // dropping the senders fails the receivers
    }

    fn is_closed(&self) -> bool {
        self.state.lock().expect("confirm lock poisoned").closed
    }

    /// Notes a run the broker returned.
    fn returned(&self, run: Uuid) {
        let mut state = self.state.lock().expect("confirm lock poisoned");
        // Bounded: returns whose publish already gave up are never taken.
        if state.returned.len() >= 10_000 {
            state.returned.clear();
        }
        state.returned.insert(run);
    }

    /// Whether the broker returned `run` (and forgets it).
    fn take_returned(&self, run: Uuid) -> bool {
        self.state
            .lock()
            .expect("confirm lock poisoned")
            .returned
            .remove(&run)
    }
}

struct ChannelEvents(Arc<Confirms>);

#[async_trait::async_trait]
impl ChannelCallback for ChannelEvents {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        tracing::warn!(reason = %close, "RabbitMQ closed the publishing channel");
        self.0.fail_all();
        Ok(())
    }
    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.0.resolve(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.0.resolve(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        _basic_properties: BasicProperties,
        content: Vec<u8>,
    ) {
        match std::str::from_utf8(&content)
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
        {
            Some(run) => {
                tracing::error!(run.id = %run, reason = %ret, "RabbitMQ returned a run as unroutable: no queue is bound for it; it stays unpublished");
                self.0.returned(run);
            }
            None => tracing::error!(reason = %ret, "RabbitMQ returned a message that is not a run"),
        }
    }
}

struct ConnectionEvents(Arc<Confirms>);

#[async_trait::async_trait]
impl ConnectionCallback for ConnectionEvents {
    async fn close(
        &mut self,
        _connection: &Connection,
        close: Close,
    ) -> Result<(), amqprs::error::Error> {
        tracing::warn!(reason = %close, "RabbitMQ closed the connection");
        self.0.fail_all();
        Ok(())
    }
    async fn blocked(&mut self, _connection: &Connection, reason: String) {
        tracing::warn!(reason, "RabbitMQ blocked publishing");
    }
    async fn unblocked(&mut self, _connection: &Connection) {
        tracing::info!("RabbitMQ unblocked publishing");
    }
    async fn secret_updated(&mut self, _connection: &Connection) {}
}

struct Live {
    _connection: Connection,
    channel: Channel,
    confirms: Arc<Confirms>,
}

struct PublisherState {
    live: Option<Live>,
    retry_at: Instant,
    backoff: Backoff,
}

/// Publishes runs with confirms; reconnects on demand. Cheap to share.
pub struct Publisher {
    config: QueueConfig,
    state: tokio::sync::Mutex<PublisherState>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("config", &self.config)
            .finish()
    }
}

impl Publisher {
    /// A publisher; it connects at the first publish.
    pub fn new(config: QueueConfig) -> Publisher {
        Publisher {
            config,
            state: tokio::sync::Mutex::new(PublisherState {
                live: None,
                retry_at: Instant::now(),
                backoff: Backoff::reconnect(),
            }),
        }
    }

    async fn connect(&self) -> Result<Live, QueueError> {
        let (connection, channel) = open(&self.config, "daisy-publisher").await?;
        let confirms = Arc::new(Confirms::new());
        let fail = |e: amqprs::error::Error| QueueError::Connect(e.to_string());
        connection
            .register_callback(ConnectionEvents(confirms.clone()))
            .await
            .map_err(fail)?;
        channel
            .register_callback(ChannelEvents(confirms.clone()))
            .await
            .map_err(fail)?;
        channel
            .confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(fail)?;
        // A network failure closes nothing by itself: watch for it.
        let watcher = confirms.clone();
        let io = connection.clone();
        tokio::spawn(async move {
            if io.listen_network_io_failure().await {
                tracing::warn!("lost the connection to RabbitMQ");
            }
            ::metrics::gauge!(crate::metrics::BROKER_CONNECTED, "role" => "publisher").set(0.0);
            watcher.fail_all();
        });
        tracing::info!("connected to RabbitMQ for publishing");
        ::metrics::gauge!(crate::metrics::BROKER_CONNECTED, "role" => "publisher").set(1.0);
        Ok(Live {
            _connection: connection,
            channel,
            confirms,
        })
    }

    /// Publishes each run and returns the ones the broker confirmed; the rest
    /// are left for the relay. Never fails as a whole.
    pub async fn publish(&self, runs: &[Outgoing]) -> Vec<Uuid> {
        let mut pending = Vec::with_capacity(runs.len());
        let confirms;
        {
            let mut state = self.state.lock().await;
            let usable = state
                .live
                .as_ref()
                .is_some_and(|l| l.channel.is_open() && !l.confirms.is_closed());
            if !usable {
                state.live = None;
                if Instant::now() < state.retry_at {
                    return Vec::new();
                }
                match self.connect().await {
                    Ok(live) => {
                        state.backoff.reset();
                        state.live = Some(live);
                    }
                    Err(err) => {
                        let delay = state.backoff.next_delay();
                        state.retry_at = Instant::now() + delay;
                        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot publish to RabbitMQ");
                        return Vec::new();
                    }
                }
            }
            let live = state.live.as_ref().expect("connected above");
            confirms = live.confirms.clone();
            for outgoing in runs {
                let run = outgoing.run;
                let Some(confirm) = live.confirms.register() else {
                    break;
                };
                let body = run.to_string().into_bytes();
                let mut props = BasicProperties::default();
                props
                    .with_persistence(true)
                    .with_message_id(&run.to_string())
                    .with_content_type("text/plain");
                if let Some(headers) = trace_headers(outgoing.traceparent.as_deref()) {
                    props.with_headers(headers);
                }
                // Mandatory: a run no queue would take comes back (see
                // `publish_return`) instead of being confirmed and lost.
                let mut args =
                    BasicPublishArguments::new(&self.config.exchange, &self.config.queue);
                args.mandatory(true);
                if let Err(err) = live.channel.basic_publish(props, body, args).await {
                    tracing::warn!(error = %err, "publishing to RabbitMQ failed");
                    live.confirms.fail_all();
                    break;
                }
                pending.push((run, confirm));
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.confirm_timeout;
        let mut confirmed = Vec::with_capacity(pending.len());
        for (run, confirm) in pending {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(true)) if confirms.take_returned(run) => {}
                Ok(Ok(true)) => confirmed.push(run),
                Ok(Ok(false)) => tracing::warn!(run.id = %run, "RabbitMQ refused (nacked) a run"),
                Ok(Err(_)) | Err(_) => {}
            }
        }
        confirmed
    }
}

/// The message headers carrying `traceparent`, if there is one.
fn trace_headers(traceparent: Option<&str>) -> Option<amqprs::FieldTable> {
    let name = amqprs::FieldName::try_from(crate::trace::TRACEPARENT).ok()?;
    let value = amqprs::LongStr::try_from(traceparent?).ok()?;
    let mut headers = amqprs::FieldTable::new();
    headers.insert(name, amqprs::FieldValue::S(value));
    Some(headers)
}
