//! RabbitMQ: where the broker is, and an exchange and queues of their own
//! ([`TestQueue`], deleted with the value).

use std::net::SocketAddr;

use uuid::Uuid;

/// The RabbitMQ tests use (`DAISY_TEST_AMQP_URL`, default the local broker).
pub fn amqp_url() -> String {
    std::env::var("DAISY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's address, from [`amqp_url`].
pub fn amqp_addr() -> SocketAddr {
    let url = amqp_url();
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("AMQP address is host:port")
}

/// An exchange and queues of this test's own, deleted when dropped.
pub struct TestQueue {
    /// The broker's URL.
    pub url: String,
    /// The exchange.
    pub exchange: String,
    /// The runs queue; `<queue>.dead` is its dead-letter queue.
    pub queue: String,
    /// The quorum queue's delivery limit.
    pub delivery_limit: u32,
}

impl TestQueue {
    /// Fresh names on [`amqp_url`]'s broker.
    pub fn new() -> TestQueue {
        TestQueue::create(&amqp_url(), "daisy.test")
    }

    /// Fresh names on the broker at `url`: exchange `<prefix>.<uuid>`, queue
    /// `<prefix>.<uuid>.runs`. Nothing is declared; Daisy does that.
    pub fn create(url: &str, prefix: &str) -> TestQueue {
        let id = Uuid::new_v4().simple().to_string();
        TestQueue {
            url: url.to_owned(),
            exchange: format!("{prefix}.{id}"),
            queue: format!("{prefix}.{id}.runs"),
            delivery_limit: 3,
        }
    }

    /// The URL reaching the broker through a relay at `relay`.
    pub fn url_via(&self, relay: SocketAddr) -> String {
        self.url
            .replace(&amqp_addr().to_string(), &relay.to_string())
    }
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let (url, exchange, queue) = (self.url.clone(), self.exchange.clone(), self.queue.clone());
        // Drop may run inside a runtime: delete from a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                use amqprs::{
                    channel::{ExchangeDeleteArguments, QueueDeleteArguments},
                    connection::{Connection, OpenConnectionArguments},
                };
                let mut args = OpenConnectionArguments::try_from(url.as_str()).ok()?;
                args.virtual_host("/");
                let connection = Connection::open(&args).await.ok()?;
                let channel = connection.open_channel(None).await.ok()?;
                for queue in [queue.clone(), format!("{queue}.dead")] {
                    let _ = channel
                        .queue_delete(QueueDeleteArguments::new(&queue))
                        .await;
                }
                let _ = channel
                    .exchange_delete(ExchangeDeleteArguments::new(&exchange))
                    .await;
                let _ = channel.close().await;
                let _ = connection.close().await;
                Some(())
            })
        })
        .join();
    }
}
