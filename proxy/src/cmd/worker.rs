//! `daisy worker`: execute asynchronous runs from RabbitMQ.

use std::time::Duration;

use anyhow::Context;
use proxy::worker::WorkerConfig;

use super::{leave, shutdown_signal};
use crate::cli::WorkerArgs;

/// `daisy worker`.
pub(crate) fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let config = WorkerConfig {
        db: args.db.config(),
        queue: args.queue.config(),
        hosts: args.hosts.config()?,
        isolation: args.hosts.isolation,
        plugins_dir: args.plugins.plugins_dir,
        prefetch: args.prefetch,
        max_concurrent_tasks: args.max_concurrent_tasks,
        retry_base: Duration::from_millis(args.retry_base_ms),
        retry_max: Duration::from_millis(args.retry_max_ms),
        max_throttled: Duration::from_millis(args.max_throttled_ms),
        max_crashes: args.max_crashes.max(1),
        lease: Duration::from_secs(args.lease_secs.max(1)),
        http_addr: args.http_addr,
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        name: args.name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        }),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let worked = runtime.block_on(proxy::worker::run(config, shutdown_signal()));
    leave(runtime);
    worked
}
