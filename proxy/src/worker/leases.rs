//! Keeping alive the leases of the runs this worker executes.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::Context;

/// How often, once stopping, it looks whether the runs it keeps are done.
const STOPPING_POLL: Duration = Duration::from_millis(100);

/// Extends the leases of the runs this worker executes, every third of a
/// lease. After `stop` it goes on while runs it executes are still
/// finishing (shutdown lets them), and returns once none is left. A failed
/// extension is logged and tried at the next tick; leases are long enough
/// to survive a few.
pub(super) async fn keep_leases(ctx: Arc<Context>, stop: CancellationToken) {
    let every = (ctx.config.lease / 3).max(Duration::from_millis(100));
    let mut tick = Instant::now() + every;
    loop {
        if stop.is_cancelled() {
            sleep(STOPPING_POLL.min(tick.saturating_duration_since(Instant::now()))).await;
        } else {
            tokio::select! {
                () = sleep_until(tick) => {}
                () = stop.cancelled() => {}
            }
        }
        let held: Vec<(uuid::Uuid, uuid::Uuid)> = ctx
            .held
            .lock()
            .expect("held runs poisoned")
            .iter()
            .map(|(run, token)| (*run, *token))
            .collect();
        if stop.is_cancelled() && held.is_empty() {
            return;
        }
        if Instant::now() < tick {
            continue;
        }
        tick = Instant::now() + every;
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
