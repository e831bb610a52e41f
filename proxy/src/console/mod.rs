//! The web console on serve's operations listener: runs by state and
//! filter, a run with its attempts, dead runs to retry, forms and their
//! tasks to enable or disable, plugin libraries. Server-rendered HTML
//! (maud), no script.
//!
//! Writes (retry, enable/disable) are HTML forms carrying a per-process
//! CSRF token, refused from another origin; with API keys on, they also
//! need an admin key typed into the form.

mod pages;

use std::{collections::HashMap, sync::Arc};

use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    auth::Keys,
    plugins::Plugins,
    registry::{Registry, RunFilter},
};

/// What the console's pages need.
#[derive(Clone)]
pub struct Console {
    registry: Registry,
    plugins: Arc<Plugins>,
    keys: Option<Arc<Keys>>,
    csrf: Arc<str>,
}

/// Runs a page shows.
const PAGE: i64 = 50;

impl Console {
    /// A console over `registry` and `plugins`; `keys` when API keys are on.
    pub fn new(
        registry: Registry,
        plugins: Arc<Plugins>,
        keys: Option<Arc<Keys>>,
    ) -> anyhow::Result<Console> {
        Ok(Console {
            registry,
            plugins,
            keys,
            csrf: crate::auth::new_token()?.into(),
        })
    }

    /// The console's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(overview))
            .route("/runs", get(runs))
            .route("/runs/{id}", get(run))
            .route("/runs/{id}/retry", post(retry_one))
            .route("/dead", get(dead))
            .route("/dead/retry", post(retry_matching))
            .route("/forms", get(forms))
            .route("/tasks/{id}/enabled", post(set_enabled))
            .route("/plugins", get(plugins))
            .with_state(self)
    }

    /// Runs `f` on the registry off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, crate::error::RegistryError> + Send + 'static,
    ) -> Result<T, Refused> {
        let registry = self.registry.clone();
        match tokio::task::spawn_blocking(move || f(&registry)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "console: the database failed");
                Err(Refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the database is unreachable; try again",
                ))
            }
            Err(_) => Err(Refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the console failed; see the server log",
            )),
        }
    }

    /// Refuses a write that lacks the CSRF token, comes from another
    /// origin, or (with API keys on) lacks an admin key.
    fn check_write(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<(), Refused> {
        let forbidden = |why: &'static str| Err(Refused(StatusCode::FORBIDDEN, why));
        if form.get("csrf").map(String::as_str) != Some(&*self.csrf) {
            return forbidden("the form is stale or forged (CSRF token); reload the page");
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if let (Some(origin), Some(host)) = (
            headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()),
            host,
        ) {
            let same = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host);
            if !same {
                return forbidden("writes come only from the console's own pages");
            }
        }
        if let Some(keys) = &self.keys {
            let key = form
                .get("admin_key")
                .map(String::as_str)
                .unwrap_or_default();
            if !keys.is_admin(key) {
                return forbidden(
                    "an admin API key is needed for this (`daisy key create --admin`)",
                );
            }
        }
        Ok(())
    }
}

fn error_page(status: StatusCode, message: &str) -> Response {
    (status, Html(pages::error(status, message).into_string())).into_response()
}

/// A request refused or failed: its status and what to tell the user.
#[derive(Debug)]
struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error_page(self.0, self.1)
    }
}

/// The filter and page position of a runs page, from its query string.
#[derive(Debug, Default, serde::Deserialize)]
struct RunsQuery {
    form: Option<String>,
    task: Option<String>,
    state: Option<String>,
    /// Only the last this many minutes.
    minutes: Option<i64>,
    /// The last row of the previous page: `<created_at µs>_<id>`.
    after: Option<String>,
}

impl RunsQuery {
    fn filter(&self) -> Result<RunFilter, Refused> {
        let bad = |what: &'static str| Refused(StatusCode::BAD_REQUEST, what);
        let some = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Ok(RunFilter {
            form: some(&self.form)
                .map(|f| f.parse().map_err(|_| bad("form is not a UUID")))
                .transpose()?,
            task: some(&self.task),
            state: some(&self.state)
                .map(|s| s.parse().map_err(|_| bad("state is not a run state")))
                .transpose()?,
            since: self
                .minutes
                .filter(|m| *m > 0)
                .map(|m| Utc::now() - chrono::Duration::minutes(m.min(525_600))),
        })
    }

    fn after(&self) -> Result<Option<(DateTime<Utc>, Uuid)>, Refused> {
        let Some(after) = self.after.as_deref().filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let parsed = after.split_once('_').and_then(|(micros, id)| {
            Some((
                DateTime::from_timestamp_micros(micros.parse().ok()?)?,
                id.parse().ok()?,
            ))
        });
        parsed.map(Some).ok_or(Refused(
            StatusCode::BAD_REQUEST,
            "after is not a page position",
        ))
    }
}

async fn overview(State(c): State<Console>) -> Response {
    let figures = c
        .read(|r| Ok((r.runs_per_minute(60)?, r.run_stats()?)))
        .await;
    match figures {
        Ok((minutes, stats)) => {
            Html(pages::overview(&minutes, &stats).into_string()).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn list(c: Console, query: RunsQuery, dead: bool) -> Response {
    let (mut filter, after) = match (query.filter(), query.after()) {
        (Ok(filter), Ok(after)) => (filter, after),
        (Err(refused), _) | (_, Err(refused)) => return refused.into_response(),
    };
    if dead {
        filter.state = Some(crate::registry::RunState::Dead);
    }
    let shown = filter.clone();
    match c.read(move |r| r.runs_page(&shown, after, PAGE)).await {
        Ok(rows) => {
            let next = (rows.len() as i64 == PAGE)
                .then(|| {
                    rows.last()
                        .map(|r| format!("{}_{}", r.created_at.timestamp_micros(), r.id))
                })
                .flatten();
            Html(
                pages::runs(
                    &filter,
                    &query_pairs(&query),
                    &rows,
                    next.as_deref(),
                    dead.then_some(&*c.csrf),
                    c.keys.is_some(),
                )
                .into_string(),
            )
            .into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

/// The filter fields of a query, to carry into the next page's link.
fn query_pairs(query: &RunsQuery) -> Vec<(&'static str, String)> {
    [
        ("form", &query.form),
        ("task", &query.task),
        ("state", &query.state),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().filter(|v| !v.is_empty()).map(|v| (k, v)))
    .chain(query.minutes.map(|m| ("minutes", m.to_string())))
    .collect()
}

async fn runs(State(c): State<Console>, Query(query): Query<RunsQuery>) -> Response {
    list(c, query, false).await
}

async fn dead(State(c): State<Console>, Query(query): Query<RunsQuery>) -> Response {
    list(c, query, true).await
}

async fn run(State(c): State<Console>, Path(id): Path<Uuid>) -> Response {
    match c.read(move |r| Ok((r.run(id)?, r.attempt_log(id)?))).await {
        Ok((Some(run), attempts)) => {
            Html(pages::run(&run, &attempts, &c.csrf, c.keys.is_some()).into_string())
                .into_response()
        }
        Ok((None, _)) => error_page(StatusCode::NOT_FOUND, "no such run"),
        Err(refused) => refused.into_response(),
    }
}

async fn retry_one(
    State(c): State<Console>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = c.check_write(&headers, &form) {
        return refused.into_response();
    }
    match c.read(move |r| r.retry_dead(Some(id))).await {
        Ok(retried) => {
            tracing::info!(run.id = %id, retried = retried.len(), "console: dead run retried");
            Redirect::to(&format!("/runs/{id}")).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn retry_matching(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = c.check_write(&headers, &form) {
        return refused.into_response();
    }
    let query = RunsQuery {
        form: form.get("form").cloned(),
        task: form.get("task").cloned(),
        ..RunsQuery::default()
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(refused) => return refused.into_response(),
    };
    match c.read(move |r| r.retry_dead_matching(&filter)).await {
        Ok(retried) => {
            tracing::info!(retried = retried.len(), "console: dead runs retried");
            Redirect::to("/dead").into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn forms(State(c): State<Console>) -> Response {
    match c.read(|r| r.list(None)).await {
        Ok(tasks) => {
            Html(pages::forms(&tasks, &c.csrf, c.keys.is_some()).into_string()).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn set_enabled(
    State(c): State<Console>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = c.check_write(&headers, &form) {
        return refused.into_response();
    }
    let enabled = form.get("enabled").map(String::as_str) == Some("true");
    match c.read(move |r| r.set_task_enabled(id, enabled)).await {
        Ok(true) => {
            tracing::info!(task.id = %id, enabled, "console: task enabled or disabled");
            Redirect::to("/forms").into_response()
        }
        Ok(false) => error_page(StatusCode::NOT_FOUND, "no such task"),
        Err(refused) => refused.into_response(),
    }
}

async fn plugins(State(c): State<Console>) -> Response {
    let modules = match c.plugins.modules() {
        Ok(modules) => modules,
        Err(err) => {
            tracing::warn!(error = %err, "console: reading the plugins directory failed");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the plugins directory cannot be read",
            );
        }
    };
    let mut libraries = Vec::with_capacity(modules.len());
    for module in modules {
        let inspected = c.plugins.inspect(&module).await.map_err(|e| e.to_string());
        let name = module.clone();
        let quarantines = c
            .read(move |r| r.quarantines(&name))
            .await
            .unwrap_or_default();
        libraries.push((module, inspected, quarantines));
    }
    Html(pages::plugins(&libraries).into_string()).into_response()
}
