//! The demo Collect backend: forms with questions, responses with answers,
//! on its own PostgreSQL database (diesel), served with axum. Its whole
//! integration with Daisy is the one `.layer(PostSubmissionLayer::new(..))`
//! on the submit route, and the [`PendingStore`] it implements on its own
//! `responses` table.
//!
//! Routes: `POST /forms`, `GET /forms/{id}`, `POST /forms/{form_id}/submit`,
//! `GET /forms/{form_id}/responses/{id}`. Errors are JSON `{"error": "..."}`
//! naming what was wrong: malformed JSON 400, unknown form or response 404,
//! a body over 64 KiB 413, unknown question, wrong answer type or a missing
//! required answer 422.

mod form;
mod response;
mod schema;
mod store;

use form::*;
pub use form::{Form, Kind, Question};
pub use response::Submission;
use response::*;
pub use store::{PgStore, post_processing_counts};

use std::{collections::HashMap, time::Duration};

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, Path, State, rejection::JsonRejection},
    http,
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use diesel::{
    PgConnection,
    prelude::*,
    r2d2::{ConnectionManager, Pool},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use post_submission::{
    PendingStore, PostSubmission, PostSubmissionLayer, StoreFuture, Stored, SubmissionContext,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use schema::{answers, forms, questions, responses};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A connection pool on the backend's database.
pub type DbPool = Pool<ConnectionManager<PgConnection>>;

/// Opens a pool on `url` and applies the backend's migrations.
pub fn connect_and_migrate(url: &str) -> anyhow::Result<DbPool> {
    let pool = Pool::builder()
        .max_size(8)
        .connection_timeout(Duration::from_secs(5))
        .build(ConnectionManager::<PgConnection>::new(url))?;
    pool.get()?
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("migrating the Collect database: {e}"))?;
    Ok(pool)
}

/// The routes, with Daisy on the submit route.
pub fn app(pool: DbPool, daisy: PostSubmission) -> Router {
    Router::new()
        .route("/forms", post(create_form))
        .route("/forms/{id}", get(get_form))
        .route(
            "/forms/{form_id}/submit",
            post(submit)
                .layer(PostSubmissionLayer::new(daisy))
                .layer(axum::middleware::from_fn(locale_from_request)),
        )
        .route("/forms/{form_id}/responses/{id}", get(get_response))
        .route("/responses/rejected", get(rejected_responses))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(pool)
}

/// An error answer: a status and a message naming the problem.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError(rejection.status(), rejection.body_text())
    }
}

pub(crate) fn internal(err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "request failed");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server log".into(),
    )
}

pub(crate) fn unprocessable(message: String) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, message)
}

pub(crate) async fn blocking<T: Send + 'static>(
    pool: &DbPool,
    f: impl FnOnce(&mut PgConnection) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = pool.get().map_err(internal)?;
        f(&mut conn)
    })
    .await
    .map_err(internal)?
}
