//! RabbitMQ through amqprs: the only module that talks AMQP.
//!
//! - `topology`: the exchange, the runs queue and its dead-letter queue,
//!   declared on every (re)connect.
//! - `publisher`: the confirming [`Publisher`].
//! - `consumer`: [`consume`], with manual, batched acks.
//!
//! This module holds what they share: the configuration and the errors.
//! Reconnects back off with [`crate::backoff::Backoff::reconnect`].

mod consumer;
mod publisher;
mod topology;

pub use consumer::{Delivery, consume, consumers_up};
pub use publisher::Publisher;

use std::time::Duration;

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

/// A run to publish, with the trace it belongs to (carried in the
/// message's `traceparent` header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The run.
    pub run: uuid::Uuid,
    /// The W3C traceparent of the call that accepted it.
    pub traceparent: Option<std::sync::Arc<str>>,
}

impl From<uuid::Uuid> for Outgoing {
    fn from(run: uuid::Uuid) -> Outgoing {
        Outgoing {
            run,
            traceparent: None,
        }
    }
}
