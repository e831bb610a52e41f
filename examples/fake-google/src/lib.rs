//! A fake Google on loopback: the OAuth token endpoint (verifies the JWT's
//! RS256 signature with a given public key, and its issuer, audience, scope
//! and lifetime), the Sheets API values endpoints (read and write the header
//! row, append rows; can answer 429 with Retry-After), the spreadsheet's
//! sheet titles and `batchUpdate` `addSheet`, and the Drive files endpoints
//! the `google_sheets` plugin uses to create, find (by `appProperties`),
//! tag and share a spreadsheet per form. Used by the plugin's tests and by
//! `make demo`; run it with `cargo run -p example-fake-google -- --help`.
//!
//! It checks requests the way the real APIs do (bearer tokens it issued,
//! paths, `valueInputOption`, grant type) and answers errors in Google's
//! shape: `{"error": {"code", "message", "status"}}`. Any single endpoint
//! can be made to answer 429 a number of times ([`Google::fail_next`]).
//!
//! This file holds the fake's state, its faults and its routes; the
//! endpoints are by API: `token` (OAuth), `sheets` (Sheets v4), `drive`
//! (Drive v3).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use serde_json::{Value, json};

mod drive;
mod sheets;
mod token;

use self::{
    drive::{files_create, files_list, files_update, permissions},
    sheets::{batch_update, spreadsheet_get, values_append, values_get, values_put},
    token::token,
};

/// A spreadsheet created through Drive: its `appProperties` and who it is shared with.
pub type Created = (Value, Vec<String>);

/// What the fake has seen, and how it should misbehave. Cheap to clone.
#[derive(Clone, Default)]
pub struct Google {
    public_key: Arc<Vec<u8>>,
    issuer: Arc<String>,
    token_url: Arc<Mutex<String>>,
    tokens: Arc<Mutex<Vec<String>>>,
    /// Token exchanges so far.
    pub exchanges: Arc<Mutex<u32>>,
    /// Spreadsheet id → sheet title → header row.
    pub headers: Arc<Mutex<HashMap<String, Vec<Value>>>>,
    /// Header writes so far.
    pub header_writes: Arc<Mutex<u32>>,
    /// Spreadsheet id → appended rows.
    pub rows: Arc<Mutex<HashMap<String, Vec<Vec<Value>>>>>,
    /// Appends to answer 429 before accepting.
    pub throttle: Arc<Mutex<u32>>,
    /// 429s answered so far.
    pub throttled: Arc<Mutex<u32>>,
    /// Appends to answer only after [`Google::slow_for`] (the row is
    /// written at once: a reply lost to the client's timeout).
    pub slow_appends: Arc<Mutex<u32>>,
    /// How late a slow append answers.
    pub slow_for: Arc<Mutex<std::time::Duration>>,
    /// Spreadsheets created through Drive: id → (appProperties as they
    /// are now, shared with).
    pub created: Arc<Mutex<HashMap<String, Created>>>,
    /// The ids of `created`, oldest first (Drive's `createdTime` order).
    created_order: Arc<Mutex<Vec<String>>>,
    /// The sheets of each spreadsheet.
    sheets: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// Step → how many of its next calls answer 429 ([`Google::fail_next`]).
    failures: Faults,
    /// Step → how many of its next calls answer 503 ([`Google::break_next`]).
    outages: Faults,
    /// Sheets write requests allowed per minute, if limited ([`Google::set_write_quota`]).
    write_quota: Arc<Mutex<Option<usize>>>,
    /// When each accepted Sheets write request came.
    writes: Arc<Mutex<Vec<std::time::Instant>>>,
    /// Writes refused for being over the quota.
    pub over_quota: Arc<Mutex<u32>>,
}

/// The steps that count as Sheets write requests against the quota.
const WRITE_STEPS: [&str; 3] = ["batchUpdate", "values.update", "values.append"];

/// The steps [`Google::fail_next`] knows, one per endpoint.
pub const STEPS: [&str; 9] = [
    "files.create",
    "files.update",
    "files.list",
    "permissions.create",
    "spreadsheets.get",
    "batchUpdate",
    "values.update",
    "values.append",
    "values.get",
];

impl Google {
    /// A fake accepting JWTs from `issuer` signed by the key whose public
    /// half is `public_key_pem`. Spreadsheet `sheet-1` with sheet
    /// `Responses` exists from the start.
    pub fn new(public_key_pem: &[u8], issuer: &str) -> Google {
        let google = Google {
            public_key: Arc::new(public_key_pem.to_vec()),
            issuer: Arc::new(issuer.to_owned()),
            ..Google::default()
        };
        google
            .sheets
            .lock()
            .expect("lock")
            .insert("sheet-1".into(), vec!["Responses".into()]);
        google
    }

    /// Revokes every access token issued so far, before its stated
    /// lifetime, as Google does when a key is rotated or access is
    /// withdrawn: calls with them get 401 until a new one is exchanged.
    pub fn revoke_tokens(&self) {
        self.tokens.lock().expect("lock").clear();
    }

    /// Makes the next `times` calls of `step` (one of [`STEPS`], named
    /// for the endpoint: `files.create`, `values.append`, ...) answer 429
    /// with `Retry-After: 1`, as Google does on a quota burst; each is
    /// counted in `throttled`. The call has no effect.
    pub fn fail_next(&self, step: &str, times: u32) {
        add_faults(&self.failures, step, times);
    }

    /// Makes the next `times` calls of `step` answer 503 without a
    /// Retry-After, as Google's backends sometimes do: a failure, not a
    /// throttle. The call has no effect.
    pub fn break_next(&self, step: &str, times: u32) {
        add_faults(&self.outages, step, times);
    }

    /// Limits Sheets write requests (appends, header writes, batch
    /// updates) to `per_minute` in any 60 seconds, as Google's per-user
    /// quota does: one more answers 429 with the seconds until a write
    /// leaves the window as its Retry-After, counted in `over_quota`.
    pub fn set_write_quota(&self, per_minute: usize) {
        *self.write_quota.lock().expect("lock") = Some(per_minute);
    }

    /// The most Sheets write requests accepted within any 60 seconds.
    pub fn most_writes_in_a_minute(&self) -> usize {
        let writes = self.writes.lock().expect("lock");
        let minute = std::time::Duration::from_secs(60);
        (0..writes.len())
            .map(|i| {
                writes[i..]
                    .iter()
                    .take_while(|&&t| t.duration_since(writes[i]) < minute)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// The 429 for `step`, if one is due ([`Google::fail_next`], or the
    /// write quota); else a write is recorded against the quota.
    fn injected(&self, step: &str) -> Option<Response> {
        if take_fault(&self.outages, step) {
            return Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The service is currently unavailable.",
            ));
        }
        if take_fault(&self.failures, step) {
            *self.throttled.lock().expect("lock") += 1;
            return Some(throttled(&format!(
                "Quota exceeded for quota metric 'Requests' ({step})"
            )));
        }
        if !WRITE_STEPS.contains(&step) {
            return None;
        }
        let now = std::time::Instant::now();
        let mut writes = self.writes.lock().expect("lock");
        if let Some(quota) = *self.write_quota.lock().expect("lock") {
            let minute = std::time::Duration::from_secs(60);
            let in_window: Vec<_> = writes
                .iter()
                .filter(|&&t| now.duration_since(t) < minute)
                .collect();
            if in_window.len() >= quota {
                let wait = minute.saturating_sub(now.duration_since(*in_window[0]));
                *self.over_quota.lock().expect("lock") += 1;
                *self.throttled.lock().expect("lock") += 1;
                return Some(
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", (wait.as_secs() + 1).to_string())],
                        Json(json!({"error": {"code": 429, "message": "Quota exceeded for quota metric 'Write requests' and limit 'Write requests per minute per user'", "status": "RESOURCE_EXHAUSTED"}})),
                    )
                        .into_response(),
                );
            }
        }
        writes.push(now);
        None
    }

    /// The sheet (tab) titles of `spreadsheet`, in order.
    pub fn sheets_of(&self, spreadsheet: &str) -> Vec<String> {
        self.sheets
            .lock()
            .expect("lock")
            .get(spreadsheet)
            .cloned()
            .unwrap_or_default()
    }

    /// Rows appended to `spreadsheet`.
    pub fn rows_of(&self, spreadsheet: &str) -> Vec<Vec<Value>> {
        self.rows
            .lock()
            .expect("lock")
            .get(spreadsheet)
            .cloned()
            .unwrap_or_default()
    }

    /// The header row of `spreadsheet`.
    pub fn header_of(&self, spreadsheet: &str) -> Vec<Value> {
        self.headers
            .lock()
            .expect("lock")
            .get(spreadsheet)
            .cloned()
            .unwrap_or_default()
    }

    /// Serves on `listener`; returns the base URL (the token endpoint is `<base>/token`).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> String {
        let base = format!("http://{}", listener.local_addr().expect("address"));
        *self.token_url.lock().expect("lock") = format!("{base}/token");
        let app = Router::new()
            .route("/token", post(token))
            .route(
                "/v4/spreadsheets/{id}/values/{range}",
                get(values_get).put(values_put).post(values_append),
            )
            .route(
                "/v4/spreadsheets/{id}",
                get(spreadsheet_get).post(batch_update),
            )
            .route("/drive/v3/files", get(files_list).post(files_create))
            .route("/drive/v3/files/{id}", patch(files_update))
            .route("/drive/v3/files/{id}/permissions", post(permissions))
            .with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "status": status.canonical_reason()}}))).into_response()
}

/// Step → faults still to answer.
type Faults = Arc<Mutex<HashMap<String, u32>>>;

/// Adds `times` faults for `step` (one of [`STEPS`]).
fn add_faults(faults: &Faults, step: &str, times: u32) {
    assert!(STEPS.contains(&step), "unknown step {step:?}");
    *faults
        .lock()
        .expect("lock")
        .entry(step.to_owned())
        .or_default() += times;
}

/// Takes one fault for `step`, if one is due.
fn take_fault(faults: &Faults, step: &str) -> bool {
    let mut faults = faults.lock().expect("lock");
    match faults.get_mut(step).filter(|left| **left > 0) {
        Some(left) => {
            *left -= 1;
            true
        }
        None => false,
    }
}

/// A 429 in Google's shape, to retry after a second.
fn throttled(message: &str) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "1")],
        Json(json!({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}})),
    )
        .into_response()
}

fn unauthorized(g: &Google, headers: &HeaderMap) -> Option<Response> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let known = bearer.is_some_and(|t| g.tokens.lock().expect("lock").iter().any(|k| k == t));
    (!known).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "Request had invalid authentication credentials.",
        )
    })
}
