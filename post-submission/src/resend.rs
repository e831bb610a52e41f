//! The resender: sends what is still pending until Daisy accepts it.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use uuid::Uuid;

use crate::PostSubmission;

/// How the resender works.
#[derive(Debug, Clone)]
pub struct Resend {
    /// Submissions pending for less than this are left to the layer.
    pub grace: Duration,
    /// How often to look for pending submissions while Daisy is healthy.
    pub interval: Duration,
    /// The longest wait between passes while Daisy keeps failing.
    pub max_backoff: Duration,
    /// The deadline of a re-send: longer than the layer's, since nobody waits.
    pub deadline: Duration,
    /// Submissions per pass.
    pub batch: usize,
}

impl Default for Resend {
    fn default() -> Self {
        Resend {
            grace: Duration::from_secs(10),
            interval: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            deadline: Duration::from_secs(30),
            batch: 100,
        }
    }
}

/// Per submission: failed sends in a row, and when to try it next.
pub(crate) type Backoffs = HashMap<Uuid, (u32, Instant)>;

/// Transient failures in a row after which a pass stops: Daisy itself is
/// down or failing, not one submission.
const DAISY_DOWN_AFTER: usize = 3;

/// The resender's one backoff, for the whole resender and for each
/// submission: `interval × 2^doublings`, capped at `max_backoff`. (Daisy's
/// own `proxy::backoff` is the same arithmetic; this crate does not depend
/// on the server's, and its waits have no jitter: one resender per backend.)
fn wait_after(resend: &Resend, doublings: u32) -> Duration {
    resend
        .interval
        .saturating_mul(1 << doublings.min(16))
        .min(resend.max_backoff)
}

impl PostSubmission {
    /// Starts the resender on the current runtime; it runs until aborted.
    ///
    /// One poison submission never blocks the others: a submission whose
    /// send fails waits out a backoff of its own (doubling from `interval`
    /// up to `max_backoff`) while the pass goes on with the next one. A
    /// submission Daisy refuses for good is marked rejected at once. Only
    /// when several sends in a row fail (Daisy is down) does the whole
    /// resender back off.
    pub fn spawn_resender(&self, resend: Resend) -> tokio::task::JoinHandle<()> {
        let daisy = self.clone();
        tokio::spawn(async move {
            // Passes that failed in a row.
            let mut failed = 0;
            loop {
                tokio::time::sleep(wait_after(&resend, failed)).await;
                failed = match daisy.resend_pass(&resend).await {
                    Ok(_) => 0,
                    Err(()) => failed.saturating_add(1),
                };
            }
        })
    }

    /// One pass: sends up to `batch` pending submissions that are not
    /// waiting out a backoff. `Err` if the store failed or Daisy looks down
    /// (several sends in a row failed; the caller backs off). Returns how
    /// many were sent.
    pub async fn resend_pass(&self, resend: &Resend) -> Result<usize, ()> {
        let waiting = self.backoff.lock().expect("backoff lock").len();
        // Ask for enough to get past those waiting out a backoff.
        let limit = resend.batch + waiting.min(resend.batch * 9);
        let pending = match self.store.pending(resend.grace, limit).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(error = %err, "listing pending submissions failed");
                return Err(());
            }
        };
        // Forget submissions that are no longer pending: the map stays bounded.
        {
            let ids: HashSet<Uuid> = pending.iter().map(|s| s.submission_id).collect();
            self.backoff
                .lock()
                .expect("backoff lock")
                .retain(|id, _| ids.contains(id));
        }
        let (mut sent, mut tried, mut failed_in_a_row) = (0, 0, 0);
        for stored in pending {
            let id = stored.submission_id;
            let due = self
                .backoff
                .lock()
                .expect("backoff lock")
                .get(&id)
                .is_none_or(|(_, next)| *next <= Instant::now());
            if !due {
                continue;
            }
            if tried == resend.batch {
                break;
            }
            tried += 1;
            match self.send(&stored, resend.deadline).await {
                Ok(_) => {
                    sent += 1;
                    failed_in_a_row = 0;
                    self.backoff.lock().expect("backoff lock").remove(&id);
                }
                // `send` marked it rejected: it leaves the pending list.
                Err(err) if err.is_final() => {
                    failed_in_a_row = 0;
                    self.backoff.lock().expect("backoff lock").remove(&id);
                }
                Err(err) => {
                    failed_in_a_row += 1;
                    let mut backoff = self.backoff.lock().expect("backoff lock");
                    let (failures, next) = backoff.entry(id).or_insert((0, Instant::now()));
                    *failures += 1;
                    let delay = wait_after(resend, *failures - 1);
                    *next = Instant::now() + delay;
                    tracing::warn!(submission.id = %id, error = %err, retry_in_ms = delay.as_millis() as u64, "re-sending to Daisy failed");
                    if failed_in_a_row >= DAISY_DOWN_AFTER {
                        return Err(());
                    }
                }
            }
        }
        if sent > 0 {
            tracing::info!(sent, "re-sent pending submissions to Daisy");
        }
        Ok(sent)
    }
}
