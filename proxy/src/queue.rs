//! RabbitMQ through amqprs: the only module that talks AMQP.
//!
//! - Topology: a durable direct exchange, the runs queue bound to it (quorum
//!   by default, with `x-delivery-limit` and dead-lettering to
//!   `<queue>.dead`), and the dead-letter queue. Declared on every (re)connect.
//! - [`Publisher`]: persistent messages with publisher confirms. amqprs gives
//!   no awaitable confirm (issue #156), so the publisher numbers its messages
//!   the way the broker does (delivery tags from 1 per channel) and resolves
//!   each one from the ack/nack callbacks, honouring `multiple`. A closed
//!   channel or connection fails everything pending; the next publish
//!   rebuilds connection, channel and topology, with backoff. No amqprs call
//!   is wrapped in a timeout or `select!` (issue #196): only our own confirm
//!   receivers are.
//! - [`consume`]: a consumer loop with manual acks and a prefetch that
//!   reconnects with backoff and drains in-flight deliveries on shutdown.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
    callbacks::{ChannelCallback, ConnectionCallback},
    channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments,
        Channel, ConfirmSelectArguments, ExchangeDeclareArguments, QueueBindArguments,
        QueueDeclareArguments,
    },
    connection::{Connection, OpenConnectionArguments},
};
use tokio::sync::{Semaphore, oneshot, watch};
use uuid::Uuid;

/// Which kind of queue carries the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated, and enforces `x-delivery-limit`: a message that keeps
    /// killing workers is dead-lettered. The default.
    Quorum,
    /// Single-node and a little faster, but without a delivery limit a
    /// message that crashes every worker is redelivered forever.
    Classic,
}

/// Where and how runs are queued.
#[derive(Clone)]
pub struct QueueConfig {
    /// `amqp://user:pass@host:port/vhost`; holds a password, never logged.
    pub url: String,
    /// The exchange runs are published to.
    pub exchange: String,
    /// The queue workers consume; `<queue>.dead` receives dead letters.
    pub queue: String,
    /// Quorum or classic.
    pub queue_type: QueueType,
    /// Deliveries after which a quorum queue dead-letters a message.
    pub delivery_limit: u32,
    /// How long a publish waits for the broker's confirm.
    pub confirm_timeout: Duration,
    /// For an `amqps://` URL: the CA (PEM) the broker's certificate must
    /// chain to; the public web roots if not given.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("url", &"<redacted>")
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}

impl QueueConfig {
    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

/// A failure talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// Connecting, opening a channel or declaring the topology failed.
    #[error("RabbitMQ unavailable: {0}")]
    Connect(String),
    /// Waiting out the backoff after a failed connect.
    #[error("RabbitMQ unavailable: reconnecting in {0:?}")]
    Backoff(Duration),
    /// A publish or ack failed on an open channel.
    #[error("RabbitMQ operation failed: {0}")]
    Operation(String),
}

fn op(err: amqprs::error::Error) -> QueueError {
    QueueError::Operation(err.to_string())
}

/// Opens a connection and a channel, and declares the topology.
async fn open(config: &QueueConfig, name: &str) -> Result<(Connection, Channel), QueueError> {
    let connect = |e: amqprs::error::Error| QueueError::Connect(e.to_string());
    let mut args = OpenConnectionArguments::try_from(config.url.as_str())
        .map_err(|_| QueueError::Connect("AMQP URL is not valid".into()))?;
    // amqprs keeps the vhost percent-encoded ("%2f" for "/").
    let vhost = percent_encoding::percent_decode_str(args.get_virtual_host())
        .decode_utf8()
        .map_err(|_| QueueError::Connect("AMQP URL's vhost is not UTF-8".into()))?
        .into_owned();
    args.virtual_host(&vhost)
        .connection_name(name)
        .heartbeat(10);
    if args.get_scheme() == Some("amqps") {
        let host = args.get_host().to_owned();
        let tls = amqprs::tls::TlsAdaptor::without_client_auth(config.ca_file.as_deref(), host)
            .map_err(|err| QueueError::Connect(format!("the broker's TLS settings: {err}")))?;
        args.tls_adaptor(tls);
    }
    let connection = Connection::open(&args).await.map_err(connect)?;
    let channel = connection.open_channel(None).await.map_err(connect)?;
    declare(&channel, config).await.map_err(connect)?;
    Ok((connection, channel))
}

async fn declare(channel: &Channel, config: &QueueConfig) -> Result<(), amqprs::error::Error> {
    channel
        .exchange_declare(
            ExchangeDeclareArguments::new(&config.exchange, "direct")
                .durable(true)
                .finish(),
        )
        .await?;
    let dead = config.dead_letter_queue();
    let mut args = FieldTable::new();
    let key = |k: &str| k.try_into().expect("short AMQP argument names");
    args.insert(key("x-dead-letter-exchange"), FieldValue::from(""));
    args.insert(
        key("x-dead-letter-routing-key"),
        FieldValue::from(dead.as_str()),
    );
    if config.queue_type == QueueType::Quorum {
        args.insert(key("x-queue-type"), FieldValue::from("quorum"));
        args.insert(
            key("x-delivery-limit"),
            FieldValue::I(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
        );
    }
    channel
        .queue_declare(
            QueueDeclareArguments::durable_client_named(&config.queue)
                .arguments(args)
                .finish(),
        )
        .await?;
    channel
        .queue_bind(QueueBindArguments::new(
            &config.queue,
            &config.exchange,
            &config.queue,
        ))
        .await?;
    channel
        .queue_declare(QueueDeclareArguments::durable_client_named(&dead).finish())
        .await?;
    Ok(())
}

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
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
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
    pub async fn publish(&self, runs: &[Uuid]) -> Vec<Uuid> {
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
            for &run in runs {
                let Some(confirm) = live.confirms.register() else {
                    break;
                };
                let body = run.to_string().into_bytes();
                let mut props = BasicProperties::default();
                props
                    .with_persistence(true)
                    .with_message_id(&run.to_string())
                    .with_content_type("text/plain");
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

/// Exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// From `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The next delay: the current step, ±25% jitter.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        jitter(step)
    }

    /// Back to the first step.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// `d` ±25%.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

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

/// Consumes `queue` with manual acks and `prefetch` until `shutdown` turns
/// true, calling `handle` for each delivery (at most `prefetch` at once).
/// Reconnects with backoff. On shutdown it stops taking deliveries and waits
/// for the handlers in flight, which ack what they finished; the broker
/// requeues the rest when the connection closes.
pub async fn consume<F, Fut>(
    config: &QueueConfig,
    queue: &str,
    prefetch: u16,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let slots = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !*shutdown.borrow() {
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
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
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
        let acker = tokio::spawn(acks.clone().run(channel.clone()));
        tokio::spawn(async move {
            io.listen_network_io_failure().await;
            let _ = lost_tx.send(());
        });
        loop {
            let message = tokio::select! {
                message = rx.recv() => message,
                _ = &mut lost => None,
                _ = shutdown.changed() => None,
            };
            let Some(message) = message else { break };
            let (Some(deliver), Some(body)) = (message.deliver, message.content) else {
                continue;
            };
            let body = String::from_utf8_lossy(&body).into_owned();
            let delivery = Delivery {
                run_id: body.trim().parse().ok(),
                redelivered: deliver.redelivered(),
                body,
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
            tokio::spawn(async move {
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
        if !*shutdown.borrow() {
            tracing::warn!(queue, "lost the RabbitMQ consumer; reconnecting");
        }
        let _ = channel.close().await;
        let _ = connection.close().await;
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
