//! Assembles and runs the gRPC server.

use std::{future::Future, sync::Arc};

use proto::v1::post_sub_proxy_server::PostSubProxyServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    Config,
    catalog::Catalog,
    executor::Executor,
    grpc::{Service, oversize_to_resource_exhausted},
    plugins::Plugins,
    registry::{Change, Registry},
};

/// Serves `PostSubProxy`, health and reflection on `listener` until
/// `shutdown` completes; then stops accepting and lets in-flight calls finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Registry::new(&config.db);
    let plugins = Arc::new(Plugins::new(&config.plugins_dir)?);
    let catalog = Arc::new(Catalog::start(registry, {
        let plugins = plugins.clone();
        move |change| {
            if let Change::Form(form) = change {
                plugins.forget_form(form);
            }
        }
    }));
    let executor = Executor::new(plugins, config.max_concurrent_tasks);
    let service = PostSubProxyServer::new(Service::new(catalog, executor))
        .max_decoding_message_size(config.max_request_bytes);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PostSubProxyServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    tracing::info!(
        addr = %listener.local_addr()?,
        plugins.dir = %config.plugins_dir.display(),
        "daisy serving"
    );
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            oversize_to_resource_exhausted,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    tracing::info!("daisy stopped");
    Ok(())
}
