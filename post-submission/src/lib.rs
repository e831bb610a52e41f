//! `post-submission`: Daisy for a form backend, in one line.
//!
//! ```text
//! let daisy = PostSubmission::new(DaisyClient::connect_lazy("http://127.0.0.1:50051", deadline)?, store);
//! daisy.spawn_resender(Resend::default());
//! let app = Router::new()
//!     .route("/forms/{form_id}/submit", post(submit).layer(PostSubmissionLayer::new(daisy)));
//! ```
//!
//! The submit handler stores the response, marked "post-processing pending"
//! in the same transaction, and answers 2xx with a JSON object and a
//! [`Stored`] response extension. The layer then calls Daisy's `Process`
//! (bounded by a deadline), marks the submission done through the
//! [`PendingStore`] once Daisy accepted it, and merges the outcome into the
//! JSON body under `post_submission`:
//!
//! - `{"status": "done", "results": [...], "enqueued": [...]}` when Daisy
//!   answered: the synchronous results and the enqueued asynchronous runs;
//! - `{"status": "pending", "reason": "..."}` when Daisy was unreachable,
//!   slow or failing. The submission stays pending, and the resender
//!   ([`PostSubmission::spawn_resender`]) sends it again after a grace
//!   period, with backoff, until Daisy accepts it. `Process` is idempotent on
//!   the submission id, so a re-send never duplicates an asynchronous task.
//! - `{"status": "rejected", "reason": "..."}` when Daisy refused the
//!   submission for good (`INVALID_ARGUMENT`: it breaks a limit;
//!   `ALREADY_EXISTS`: its id was used for another form or submission;
//!   `PERMISSION_DENIED`). Sending it again cannot help, so it leaves the
//!   pending list through [`PendingStore::mark_rejected`], with the reason.
//!
//! Non-2xx responses, and responses without [`Stored`], pass through untouched.

mod client;
mod layer;
mod resend;

pub use client::{Credentials, DaisyClient, DaisyError};
pub use layer::{PostSubmissionLayer, PostSubmissionService};
/// Who submitted, and for whom: the form's organisation and owners, the
/// submitter and their locale. Tasks see it as `plugin_api::Context`.
///
/// Set it on [`Stored::context`], or put it in the submit request's
/// extensions (an authentication middleware knows the submitter): the layer
/// sends the request's when the handler's [`Stored`] carries none.
pub use proto::v1::SubmissionContext;
pub use resend::Resend;

use std::{future::Future, pin::Pin, sync::Arc};

use uuid::Uuid;

/// What the submit handler stored, attached to its response as an extension
/// (`(Extension(stored), Json(body))`) for the layer to send to Daisy.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The form's id.
    pub form_id: Uuid,
    /// The stored response's id: Daisy's idempotency key.
    pub submission_id: Uuid,
    /// The stored response, as the plugins should see it (a JSON object).
    pub submission: serde_json::Value,
    /// Who submitted, and for whom; `None` sends the submit request's
    /// [`SubmissionContext`] extension, if any. Keep what is needed to build
    /// it again for [`PendingStore::pending`], so that a re-send carries it.
    pub context: Option<SubmissionContext>,
}

/// A boxed error from the backend's store.
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future, so the store trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The backend's record of which submissions still await Daisy.
///
/// A submission is born pending: the backend stores it as such in the same
/// transaction as the response itself, so a crash between storing and
/// calling Daisy loses nothing.
pub trait PendingStore: Send + Sync + 'static {
    /// Daisy accepted this submission.
    fn mark_done(&self, submission_id: Uuid) -> StoreFuture<'_, ()>;
    /// Daisy refused this submission for good (`reason` says why): it must
    /// leave the pending list, and the backend should keep it where people
    /// can see it.
    fn mark_rejected(&self, submission_id: Uuid, reason: String) -> StoreFuture<'_, ()>;
    /// Up to `limit` submissions pending for longer than `older_than`, oldest first.
    fn pending(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Stored>>;
}

/// The Daisy client and the backend's store: what the layer and the resender share.
#[derive(Clone)]
pub struct PostSubmission {
    client: DaisyClient,
    store: Arc<dyn PendingStore>,
    /// The resender's per-submission backoff (see [`Resend`]).
    backoff: Arc<std::sync::Mutex<resend::Backoffs>>,
}

impl std::fmt::Debug for PostSubmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostSubmission")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl PostSubmission {
    /// Sends stored submissions through `client`, tracking them in `store`.
    pub fn new(client: DaisyClient, store: impl PendingStore) -> PostSubmission {
        PostSubmission {
            client,
            store: Arc::new(store),
            backoff: Arc::default(),
        }
    }

    /// Sends one stored submission to Daisy within `deadline`; on success
    /// marks it done and returns the `post_submission` JSON.
    pub async fn send(
        &self,
        stored: &Stored,
        deadline: std::time::Duration,
    ) -> Result<serde_json::Value, DaisyError> {
        let outcome = match self.client.process(stored, deadline).await {
            Ok(outcome) => outcome,
            Err(err) if err.is_final() => {
                tracing::warn!(submission.id = %stored.submission_id, error = %err, "Daisy refused the submission for good; it is marked rejected");
                if let Err(store_err) = self
                    .store
                    .mark_rejected(stored.submission_id, err.to_string())
                    .await
                {
                    tracing::warn!(submission.id = %stored.submission_id, error = %store_err, "marking a submission rejected failed");
                }
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        if let Err(err) = self.store.mark_done(stored.submission_id).await {
            // Still pending in the store: the resender sends it again, and
            // Daisy answers a replay with the same runs.
            tracing::warn!(submission.id = %stored.submission_id, error = %err, "marking a submission done failed");
        }
        Ok(outcome)
    }
}
