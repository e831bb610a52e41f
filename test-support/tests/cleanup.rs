//! The support types leave nothing behind.

use amqprs::{
    channel::QueueDeclareArguments,
    connection::{Connection, OpenConnectionArguments},
};
use test_support::{TestQueue, amqp_url};

async fn queue_exists(name: &str) -> bool {
    let mut args = OpenConnectionArguments::try_from(amqp_url().as_str()).expect("AMQP URL");
    args.virtual_host("/");
    let connection = Connection::open(&args).await.expect("connecting");
    let channel = connection.open_channel(None).await.expect("channel");
    let found = channel
        .queue_declare(QueueDeclareArguments::new(name).passive(true).finish())
        .await
        .is_ok();
    let _ = connection.close().await;
    found
}

#[tokio::test]
async fn a_test_queue_deletes_its_queues_when_dropped() {
    let queue = TestQueue::new();
    let name = queue.queue.clone();
    {
        let mut args = OpenConnectionArguments::try_from(amqp_url().as_str()).expect("AMQP URL");
        args.virtual_host("/");
        let connection = Connection::open(&args).await.expect("connecting");
        let channel = connection.open_channel(None).await.expect("channel");
        channel
            .queue_declare(QueueDeclareArguments::durable_client_named(&name).finish())
            .await
            .expect("declaring");
        let _ = connection.close().await;
    }
    assert!(queue_exists(&name).await);
    drop(queue);
    assert!(!queue_exists(&name).await, "{name} is still there");
}
