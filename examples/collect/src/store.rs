//! The [`PendingStore`] on the `responses` table, and the post-processing
//! counts the demo prints.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The backend's [`PendingStore`]: the `post_processing` column of `responses`.
#[derive(Clone)]
pub struct PgStore(pub DbPool);

impl PendingStore for PgStore {
    fn mark_done(&self, submission_id: Uuid) -> StoreFuture<'_, ()> {
        let pool = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                diesel::update(responses::table.find(submission_id))
                    .set((
                        responses::post_processing.eq("done"),
                        responses::post_processed_at.eq(diesel::dsl::now),
                    ))
                    .execute(&mut conn)?;
                Ok(())
            })
            .await?
        })
    }

    fn mark_rejected(&self, submission_id: Uuid, reason: String) -> StoreFuture<'_, ()> {
        let pool = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                diesel::update(responses::table.find(submission_id))
                    .set((
                        responses::post_processing.eq("rejected"),
                        responses::post_processing_error.eq(reason),
                        responses::post_processed_at.eq(diesel::dsl::now),
                    ))
                    .execute(&mut conn)?;
                Ok(())
            })
            .await?
        })
    }

    fn pending(&self, older_than: Duration, limit: usize) -> StoreFuture<'_, Vec<Stored>> {
        let pool = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                let cutoff = Utc::now() - chrono::Duration::from_std(older_than)?;
                let due: Vec<(Uuid, Uuid)> = responses::table
                    .filter(responses::post_processing.eq("pending"))
                    .filter(responses::submitted_at.le(cutoff))
                    .order(responses::submitted_at)
                    .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                    .select((responses::form_id, responses::id))
                    .load(&mut conn)?;
                let mut stored = Vec::with_capacity(due.len());
                for (form_id, id) in due {
                    if let Some((_, s)) = load_response(&mut conn, form_id, id).map_err(|e| e.1)? {
                        stored.push(s);
                    }
                }
                Ok(stored)
            })
            .await?
        })
    }
}

/// Counts of responses by post-processing state, for tests and the demo.
pub fn post_processing_counts(pool: &DbPool) -> anyhow::Result<HashMap<String, i64>> {
    let mut conn = pool.get()?;
    let rows: Vec<(String, i64)> = responses::table
        .group_by(responses::post_processing)
        .select((responses::post_processing, diesel::dsl::count_star()))
        .load(&mut conn)?;
    Ok(rows.into_iter().collect())
}
