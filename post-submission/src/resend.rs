//! The resender: sends what is still pending until Daisy accepts it.

use std::time::Duration;

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

impl PostSubmission {
    /// Starts the resender on the current runtime; it runs until aborted.
    pub fn spawn_resender(&self, resend: Resend) -> tokio::task::JoinHandle<()> {
        let daisy = self.clone();
        tokio::spawn(async move {
            let mut wait = resend.interval;
            loop {
                tokio::time::sleep(wait).await;
                wait = match daisy.resend_pass(&resend).await {
                    Ok(_) => resend.interval,
                    Err(()) => (wait * 2).min(resend.max_backoff),
                };
            }
        })
    }

    /// One pass: sends up to `batch` pending submissions; `Err` if Daisy or
    /// the store failed (the caller backs off). Returns how many were sent.
    pub async fn resend_pass(&self, resend: &Resend) -> Result<usize, ()> {
        let pending = match self.store.pending(resend.grace, resend.batch).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(error = %err, "listing pending submissions failed");
                return Err(());
            }
        };
        let mut sent = 0;
        for stored in pending {
            match self.send(&stored, resend.deadline).await {
                Ok(_) => sent += 1,
                Err(err) => {
                    tracing::warn!(submission.id = %stored.submission_id, error = %err, "re-sending to Daisy failed; backing off");
                    return Err(());
                }
            }
        }
        if sent > 0 {
            tracing::info!(sent, "re-sent pending submissions to Daisy");
        }
        Ok(sent)
    }
}
