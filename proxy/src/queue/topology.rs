//! The topology: a durable direct exchange, the runs queue bound to it
//! (quorum by default, with `x-delivery-limit` and dead-lettering to
//! `<queue>.dead`), and the dead-letter queue. Declared on every (re)connect,
//! by [`open`].

use amqprs::{
    FieldTable, FieldValue,
    channel::{Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments},
    connection::{Connection, OpenConnectionArguments},
};

use super::{QueueConfig, QueueError, QueueType};

/// Opens a connection and a channel, and declares the topology.
pub(super) async fn open(
    config: &QueueConfig,
    name: &str,
) -> Result<(Connection, Channel), QueueError> {
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
