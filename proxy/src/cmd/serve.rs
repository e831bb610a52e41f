//! `daisy serve`: the PostSubProxy gRPC service (and the relay).

use std::time::Duration;

use anyhow::Context;
use proxy::Config;

use super::{leave, shutdown_signal};
use crate::cli::ServeArgs;

/// `daisy serve`.
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let security = proxy::security::decide(
            listener.local_addr()?,
            proxy::security::Requested {
                auth: args.auth,
                tls: args
                    .tls_cert
                    .zip(args.tls_key)
                    .map(|(cert, key)| proxy::security::TlsFiles {
                        cert,
                        key,
                        client_ca: args.client_ca,
                    }),
                reflection: args.reflection,
                insecure: args.insecure,
            },
        )
        .map_err(|refusal| anyhow::anyhow!(refusal))?;
        let config = Config {
            db: args.db.config(),
            hosts: args.hosts.config()?,
            isolation: args.hosts.isolation,
            plugins_dir: args.plugins.plugins_dir,
            max_request_bytes: args.max_request_bytes,
            limits: proxy::grpc::Limits {
                max_depth: args.max_depth.max(1),
                max_keys: args.max_keys,
                max_string_bytes: args.max_string_bytes,
            },
            max_concurrent_tasks: args.max_concurrent_tasks,
            queue: args.queue.config(),
            outbox_grace: Duration::from_millis(args.outbox_grace_ms),
            relay_interval: Duration::from_millis(args.relay_interval_ms),
            stale_after: Duration::from_secs(args.stale_after_secs),
            sync_run_log: args.sync_run_log,
            retain: (args.retain_days > 0)
                .then(|| Duration::from_secs(args.retain_days.saturating_mul(86_400))),
            security,
            http_addr: args.http_addr,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        };
        proxy::run(listener, config, shutdown_signal()).await
    });
    leave(runtime);
    served
}
