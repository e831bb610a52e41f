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

mod schema;

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

fn internal(err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "request failed");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server log".into(),
    )
}

fn unprocessable(message: String) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, message)
}

async fn blocking<T: Send + 'static>(
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

/// The kinds of question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A string.
    Text,
    /// A number.
    Number,
    /// true or false.
    Boolean,
    /// One of `options`.
    Choice,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Number => "number",
            Kind::Boolean => "boolean",
            Kind::Choice => "choice",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "number" => Kind::Number,
            "boolean" => Kind::Boolean,
            "choice" => Kind::Choice,
            _ => Kind::Text,
        }
    }
}

/// A question, as created and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    /// Its id (assigned).
    #[serde(default)]
    pub id: Option<Uuid>,
    /// How answers name it.
    pub key: String,
    /// What the respondent sees.
    pub label: String,
    /// Its type.
    pub kind: Kind,
    /// Whether an answer is required.
    #[serde(default)]
    pub required: bool,
    /// The choices, for `choice`.
    #[serde(default)]
    pub options: Vec<String>,
    /// Free-form metadata.
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// A form, as created and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Form {
    /// Its id (assigned).
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Its title.
    pub title: String,
    /// Free-form metadata.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Who owns the form: Daisy's tasks see it in the submission context
    /// (google_sheets shares the form's spreadsheet with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_email: Option<String>,
    /// Its questions, in order.
    pub questions: Vec<Question>,
}

async fn create_form(
    State(pool): State<DbPool>,
    body: Result<Json<Form>, JsonRejection>,
) -> Result<(StatusCode, Json<Form>), ApiError> {
    let Json(mut form) = body?;
    if form.title.trim().is_empty() {
        return Err(unprocessable("title must not be empty".into()));
    }
    if let Some(owner) = &form.owner_email {
        let (local, domain) = owner.split_once('@').unwrap_or_default();
        if local.is_empty() || !domain.contains('.') || owner.chars().any(char::is_whitespace) {
            return Err(unprocessable(format!(
                "owner_email '{owner}' is not an email address"
            )));
        }
    }
    let mut keys = std::collections::HashSet::new();
    for q in &form.questions {
        if q.key.is_empty()
            || !q
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(unprocessable(format!(
                "question key '{}' must be letters, digits or '_'",
                q.key
            )));
        }
        if !keys.insert(q.key.clone()) {
            return Err(unprocessable(format!(
                "question key '{}' is used twice",
                q.key
            )));
        }
        if q.kind == Kind::Choice && q.options.is_empty() {
            return Err(unprocessable(format!(
                "choice question '{}' needs options",
                q.key
            )));
        }
    }
    let form_id = Uuid::new_v4();
    form.id = Some(form_id);
    for q in &mut form.questions {
        q.id = Some(Uuid::new_v4());
    }
    let saved = form.clone();
    blocking(&pool, move |conn| {
        conn.transaction(|conn| {
            diesel::insert_into(forms::table)
                .values((
                    forms::id.eq(form_id),
                    forms::title.eq(&saved.title),
                    forms::metadata.eq(&saved.metadata),
                    forms::owner_email.eq(&saved.owner_email),
                ))
                .execute(conn)?;
            let rows: Vec<_> = saved
                .questions
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    (
                        questions::id.eq(q.id.unwrap_or_default()),
                        questions::form_id.eq(form_id),
                        questions::key.eq(&q.key),
                        questions::label.eq(&q.label),
                        questions::kind.eq(q.kind.as_str()),
                        questions::required.eq(q.required),
                        questions::options.eq(json!(q.options)),
                        questions::position.eq(i as i32),
                        questions::metadata.eq(&q.metadata),
                    )
                })
                .collect();
            diesel::insert_into(questions::table)
                .values(&rows)
                .execute(conn)?;
            Ok::<_, diesel::result::Error>(())
        })
        .map_err(internal)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(form)))
}

type QuestionRow = (Uuid, String, String, String, bool, Value, Value);

fn load_form(conn: &mut PgConnection, id: Uuid) -> Result<Option<Form>, ApiError> {
    let found: Option<(String, Value, Option<String>)> = forms::table
        .find(id)
        .select((forms::title, forms::metadata, forms::owner_email))
        .first(conn)
        .optional()
        .map_err(internal)?;
    let Some((title, metadata, owner_email)) = found else {
        return Ok(None);
    };
    let rows: Vec<QuestionRow> = questions::table
        .filter(questions::form_id.eq(id))
        .order(questions::position)
        .select((
            questions::id,
            questions::key,
            questions::label,
            questions::kind,
            questions::required,
            questions::options,
            questions::metadata,
        ))
        .load(conn)
        .map_err(internal)?;
    Ok(Some(Form {
        id: Some(id),
        title,
        metadata,
        owner_email,
        questions: rows
            .into_iter()
            .map(
                |(qid, key, label, kind, required, options, metadata)| Question {
                    id: Some(qid),
                    key,
                    label,
                    kind: Kind::parse(&kind),
                    required,
                    options: serde_json::from_value(options).unwrap_or_default(),
                    metadata,
                },
            )
            .collect(),
    }))
}

async fn get_form(
    State(pool): State<DbPool>,
    Path(id): Path<Uuid>,
) -> Result<Json<Form>, ApiError> {
    blocking(&pool, move |conn| load_form(conn, id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no form {id}")))
}

/// A submission: answers by question key, and metadata.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// Question key → answer.
    pub answers: serde_json::Map<String, Value>,
    /// Free-form metadata (device, locale, ...).
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

/// Checks `answers` against the form's questions.
fn validate(form: &Form, answers: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for key in answers.keys() {
        if !form.questions.iter().any(|q| &q.key == key) {
            return Err(unprocessable(format!("unknown question '{key}'")));
        }
    }
    for q in &form.questions {
        let Some(answer) = answers.get(&q.key).filter(|v| !v.is_null()) else {
            if q.required {
                return Err(unprocessable(format!("question '{}' is required", q.key)));
            }
            continue;
        };
        let ok = match q.kind {
            Kind::Text => answer.is_string(),
            Kind::Number => answer.is_number(),
            Kind::Boolean => answer.is_boolean(),
            Kind::Choice => answer
                .as_str()
                .is_some_and(|a| q.options.iter().any(|o| o == a)),
        };
        if !ok {
            let expected = match q.kind {
                Kind::Choice => format!("one of {:?}", q.options),
                kind => format!("a {}", kind.as_str()),
            };
            return Err(unprocessable(format!(
                "answer to '{}' must be {expected}, got {answer}",
                q.key
            )));
        }
    }
    Ok(())
}

/// What Daisy's plugins see for a response.
fn daisy_view(
    form_id: Uuid,
    response_id: Uuid,
    answers: &serde_json::Map<String, Value>,
    metadata: &Value,
) -> Value {
    json!({ "form_id": form_id, "response_id": response_id, "answers": answers, "metadata": metadata })
}

/// What Daisy's tasks learn of a submission to a form owned by `owner`.
/// The submitter's locale comes from the request (see [`locale_from_request`]).
fn context_of(owner: Option<String>) -> SubmissionContext {
    SubmissionContext {
        owner_emails: owner.into_iter().collect(),
        ..SubmissionContext::default()
    }
}

/// Puts the submitter's locale (the first tag of `Accept-Language`) in the
/// request's [`SubmissionContext`] extension, where the Daisy layer finds it.
async fn locale_from_request(mut request: axum::extract::Request, next: Next) -> Response {
    let locale = request
        .headers()
        .get(http::header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split([',', ';']).next())
        .map(str::trim)
        .filter(|tag| !tag.is_empty() && tag.len() <= 35 && *tag != "*")
        .map(str::to_owned);
    if let Some(locale) = locale {
        request.extensions_mut().insert(SubmissionContext {
            locale,
            ..SubmissionContext::default()
        });
    }
    next.run(request).await
}

async fn submit(
    State(pool): State<DbPool>,
    Path(form_id): Path<Uuid>,
    body: Result<Json<Submission>, JsonRejection>,
) -> Result<(StatusCode, Extension<Stored>, Json<Value>), ApiError> {
    let Json(submission) = body?;
    let response_id = Uuid::new_v4();
    let (submitted_at, submission, context) = blocking(&pool, move |conn| {
        let form = load_form(conn, form_id)?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no form {form_id}")))?;
        validate(&form, &submission.answers)?;
        // The response is born pending, in its own transaction.
        conn.transaction(|conn| {
            let at: DateTime<Utc> = diesel::insert_into(responses::table)
                .values((
                    responses::id.eq(response_id),
                    responses::form_id.eq(form_id),
                    responses::metadata.eq(&submission.metadata),
                ))
                .returning(responses::submitted_at)
                .get_result(conn)?;
            let rows: Vec<_> = form
                .questions
                .iter()
                .filter_map(|q| {
                    let value = submission.answers.get(&q.key)?;
                    Some((
                        answers::response_id.eq(response_id),
                        answers::question_id.eq(q.id.unwrap_or_default()),
                        answers::value.eq(value.clone()),
                    ))
                })
                .collect();
            diesel::insert_into(answers::table)
                .values(&rows)
                .execute(conn)?;
            Ok::<DateTime<Utc>, diesel::result::Error>(at)
        })
        .map_err(internal)
        .map(|at| (at, submission, context_of(form.owner_email)))
    })
    .await?;
    let view = daisy_view(
        form_id,
        response_id,
        &submission.answers,
        &submission.metadata,
    );
    let stored = Stored {
        form_id,
        submission_id: response_id,
        submission: view,
        context: Some(context),
    };
    let body = json!({
        "id": response_id,
        "form_id": form_id,
        "answers": submission.answers,
        "metadata": submission.metadata,
        "submitted_at": submitted_at,
    });
    Ok((StatusCode::CREATED, Extension(stored), Json(body)))
}

fn load_response(
    conn: &mut PgConnection,
    form_id: Uuid,
    id: Uuid,
) -> Result<Option<(Value, Stored)>, ApiError> {
    let found: Option<(Value, DateTime<Utc>, String)> = responses::table
        .find(id)
        .filter(responses::form_id.eq(form_id))
        .select((
            responses::metadata,
            responses::submitted_at,
            responses::post_processing,
        ))
        .first(conn)
        .optional()
        .map_err(internal)?;
    let Some((metadata, submitted_at, post_processing)) = found else {
        return Ok(None);
    };
    let rows: Vec<(String, Value)> = answers::table
        .inner_join(questions::table)
        .filter(answers::response_id.eq(id))
        .order(questions::position)
        .select((questions::key, answers::value))
        .load(conn)
        .map_err(internal)?;
    let answers: serde_json::Map<String, Value> = rows.into_iter().collect();
    let body = json!({
        "id": id,
        "form_id": form_id,
        "answers": answers,
        "metadata": metadata,
        "submitted_at": submitted_at,
        "post_processing": post_processing,
    });
    let owner_email: Option<String> = forms::table
        .find(form_id)
        .select(forms::owner_email)
        .first(conn)
        .optional()
        .map_err(internal)?
        .flatten();
    let stored = Stored {
        form_id,
        submission_id: id,
        submission: daisy_view(form_id, id, &answers, &metadata),
        context: Some(context_of(owner_email)),
    };
    Ok(Some((body, stored)))
}

async fn get_response(
    State(pool): State<DbPool>,
    Path((form_id, id)): Path<(Uuid, Uuid)>,
) -> Result<Json<Value>, ApiError> {
    blocking(&pool, move |conn| load_response(conn, form_id, id))
        .await?
        .map(|(body, _)| Json(body))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no response {id} for form {form_id}"),
            )
        })
}

/// The responses Daisy refused for good, newest first, with the reason:
/// `[{"id", "form_id", "submitted_at", "reason"}]` (at most 1,000).
async fn rejected_responses(State(pool): State<DbPool>) -> Result<Json<Value>, ApiError> {
    let rows: Vec<(Uuid, Uuid, DateTime<Utc>, Option<String>)> = blocking(&pool, |conn| {
        responses::table
            .filter(responses::post_processing.eq("rejected"))
            .order(responses::submitted_at.desc())
            .limit(1000)
            .select((
                responses::id,
                responses::form_id,
                responses::submitted_at,
                responses::post_processing_error,
            ))
            .load(conn)
            .map_err(internal)
    })
    .await?;
    Ok(Json(Value::Array(
        rows.into_iter()
            .map(|(id, form_id, submitted_at, reason)| {
                json!({"id": id, "form_id": form_id, "submitted_at": submitted_at, "reason": reason})
            })
            .collect(),
    )))
}

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
