//! Keeping alive the leases of the runs this worker executes.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::Context;

/// Extends the leases of the runs this worker executes, every third of a
/// lease, until shutdown. A failed extension is logged and tried at the next
/// tick; leases are long enough to survive a few.
pub(super) async fn keep_leases(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let every = (ctx.config.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let held: Vec<(uuid::Uuid, uuid::Uuid)> = ctx
            .held
            .lock()
            .expect("held runs poisoned")
            .iter()
            .map(|(run, token)| (*run, *token))
            .collect();
        if held.is_empty() {
            continue;
        }
        let (registry, lease) = (ctx.registry.clone(), ctx.config.lease);
        match tokio::task::spawn_blocking(move || registry.extend_leases(&held, lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "extending run leases failed; retrying at the next tick")
            }
            Err(join) => tracing::error!(error = %join, "extending run leases panicked"),
        }
    }
}
