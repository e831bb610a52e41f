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

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use serde_json::{Value, json};

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

async fn token(State(g): State<Google>, Form(form): Form<HashMap<String, String>>) -> Response {
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&g.public_key) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the fake has no valid public key",
        );
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[g.token_url.lock().expect("lock").as_str()]);
    validation.set_issuer(&[g.issuer.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = match jsonwebtoken::decode::<Value>(
        form.get("assertion").map_or("", String::as_str),
        &key,
        &validation,
    ) {
        Ok(data) => data.claims,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant", "error_description": err.to_string()})),
            )
                .into_response();
        }
    };
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope
        .split(' ')
        .any(|s| s == "https://www.googleapis.com/auth/spreadsheets")
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_scope"})),
        )
            .into_response();
    }
    let lifetime = claims["exp"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(claims["iat"].as_u64().unwrap_or(0));
    if lifetime > 3600 {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": "token lifetime over an hour"}))).into_response();
    }
    let mut exchanges = g.exchanges.lock().expect("lock");
    *exchanges += 1;
    let token = format!("ya29.fake-{}-{}", *exchanges, uuid::Uuid::new_v4().simple());
    g.tokens.lock().expect("lock").push(token.clone());
    Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})).into_response()
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

/// Splits `'Sheet name'!A1` into the sheet and the cells.
fn split_range(range: &str) -> Option<(String, &str)> {
    let (sheet, cells) = range.rsplit_once('!')?;
    let sheet = sheet
        .strip_prefix('\'')?
        .strip_suffix('\'')?
        .replace("''", "'");
    Some((sheet, cells))
}

fn known_sheet(g: &Google, id: &str, sheet: &str) -> bool {
    g.sheets
        .lock()
        .expect("lock")
        .get(id)
        .is_some_and(|s| s.iter().any(|t| t == sheet))
}

async fn values_get(
    State(g): State<Google>,
    Path((id, range)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if let Some(failed) = g.injected("values.get") {
        return failed;
    }
    match split_range(&range) {
        Some((sheet, "A:A")) if known_sheet(&g, &id, &sheet) => {
            // The first column, header included, one row per cell.
            let header = g.header_of(&id);
            let column: Vec<Value> = header
                .first()
                .into_iter()
                .cloned()
                .chain(
                    g.rows_of(&id)
                        .into_iter()
                        .map(|row| row.first().cloned().unwrap_or(Value::Null)),
                )
                .map(|cell| json!([cell]))
                .collect();
            Json(json!({"range": range, "majorDimension": "ROWS", "values": column}))
                .into_response()
        }
        Some((sheet, "1:1")) if known_sheet(&g, &id, &sheet) => {
            let header = g.header_of(&id);
            let values = if header.is_empty() {
                json!([])
            } else {
                json!([header])
            };
            Json(json!({"range": range, "majorDimension": "ROWS", "values": values}))
                .into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("Requested entity was not found: {id} {range}"),
        ),
    }
}

async fn values_put(
    State(g): State<Google>,
    Path((id, range)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if !query.contains_key("valueInputOption") {
        return error(
            StatusCode::BAD_REQUEST,
            "'valueInputOption' is required but not specified",
        );
    }
    if let Some(failed) = g.injected("values.update") {
        return failed;
    }
    match split_range(&range) {
        Some((sheet, "1:1")) if known_sheet(&g, &id, &sheet) => {
            let header = body["values"][0].as_array().cloned().unwrap_or_default();
            g.headers.lock().expect("lock").insert(id, header);
            *g.header_writes.lock().expect("lock") += 1;
            Json(json!({"updatedRange": range})).into_response()
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            &format!("Unable to parse range: {range}"),
        ),
    }
}

async fn values_append(
    State(g): State<Google>,
    Path((id, range)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let Some(range) = range.strip_suffix(":append") else {
        return error(StatusCode::NOT_FOUND, "Method not found.");
    };
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if query.get("valueInputOption").map(String::as_str) != Some("RAW") {
        return error(StatusCode::BAD_REQUEST, "Invalid valueInputOption");
    }
    if !split_range(range).is_some_and(|(sheet, _)| known_sheet(&g, &id, &sheet)) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("Unable to parse range: {range}"),
        );
    }
    if let Some(failed) = g.injected("values.append") {
        return failed;
    }
    {
        let mut throttle = g.throttle.lock().expect("lock");
        if *throttle > 0 {
            *throttle -= 1;
            *g.throttled.lock().expect("lock") += 1;
            return throttled("Quota exceeded for quota metric 'Write requests'");
        }
    }
    let written = {
        let mut rows = g.rows.lock().expect("lock");
        let sheet_rows = rows.entry(id).or_default();
        for row in body["values"].as_array().into_iter().flatten() {
            sheet_rows.push(row.as_array().cloned().unwrap_or_default());
        }
        sheet_rows.len()
    };
    let slow = {
        let mut slow = g.slow_appends.lock().expect("lock");
        let due = *slow > 0;
        *slow = slow.saturating_sub(1);
        due
    };
    if slow {
        let delay = *g.slow_for.lock().expect("lock");
        tokio::time::sleep(delay).await;
    }
    Json(json!({"updates": {"updatedRange": format!("{range}{}", written + 1), "updatedRows": 1}}))
        .into_response()
}

/// `GET /v4/spreadsheets/{id}`: the spreadsheet's sheets (what
/// `fields=sheets.properties.title` asks for; other fields are not kept).
async fn spreadsheet_get(
    State(g): State<Google>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if let Some(failed) = g.injected("spreadsheets.get") {
        return failed;
    }
    let Some(titles) = g.sheets.lock().expect("lock").get(&id).cloned() else {
        return error(StatusCode::NOT_FOUND, "Requested entity was not found.");
    };
    let sheets: Vec<Value> = titles
        .iter()
        .map(|title| json!({"properties": {"title": title}}))
        .collect();
    Json(json!({"sheets": sheets})).into_response()
}

/// `POST /v4/spreadsheets/{id}:batchUpdate` with `addSheet` requests:
/// all or nothing, and a title that exists already is refused (400), as
/// Google does.
async fn batch_update(
    State(g): State<Google>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let Some(id) = id.strip_suffix(":batchUpdate") else {
        return error(StatusCode::NOT_FOUND, "Method not found.");
    };
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if let Some(failed) = g.injected("batchUpdate") {
        return failed;
    }
    let mut sheets = g.sheets.lock().expect("lock");
    let Some(titles) = sheets.get_mut(id) else {
        return error(StatusCode::NOT_FOUND, "Requested entity was not found.");
    };
    let mut added = titles.clone();
    for (i, request) in body["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(title) = request["addSheet"]["properties"]["title"].as_str() {
            if added.iter().any(|t| t == title) {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "Invalid requests[{i}].addSheet: A sheet with the name \"{title}\" already exists. Please enter another name."
                    ),
                );
            }
            added.push(title.to_owned());
        }
    }
    *titles = added;
    Json(json!({"spreadsheetId": id, "replies": []})).into_response()
}

/// The `key` and `value` of a query `appProperties has { key='K' and value='V' }`.
fn app_property_query(q: &str) -> Option<(&str, &str)> {
    let rest = q.split_once("appProperties has {")?.1;
    let key = rest.split_once("key='")?.1.split_once('\'')?.0;
    let value = rest.split_once("value='")?.1.split_once('\'')?.0;
    Some((key, value))
}

/// `GET /drive/v3/files?q=appProperties has {...}`: the files whose
/// `appProperties` hold that key and value; oldest first with
/// `orderBy=createdTime`, else newest first (Drive promises no order).
async fn files_list(
    State(g): State<Google>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if let Some(failed) = g.injected("files.list") {
        return failed;
    }
    let q = query.get("q").cloned().unwrap_or_default();
    let Some((key, value)) = app_property_query(&q) else {
        return error(StatusCode::BAD_REQUEST, "Invalid Value");
    };
    let created = g.created.lock().expect("lock");
    let mut ids = g.created_order.lock().expect("lock").clone();
    match query.get("orderBy").map(String::as_str) {
        Some("createdTime") => {}
        None => ids.reverse(),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid field selection {other}"),
            );
        }
    }
    let files: Vec<Value> = ids
        .into_iter()
        .filter(|id| {
            created
                .get(id)
                .is_some_and(|(props, _)| props[key].as_str() == Some(value))
        })
        .map(|id| json!({"id": id}))
        .collect();
    Json(json!({"files": files})).into_response()
}

/// `PATCH /drive/v3/files/{id}`: `appProperties` are merged into the
/// file's, and a key set to null is removed.
async fn files_update(
    State(g): State<Google>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if let Some(failed) = g.injected("files.update") {
        return failed;
    }
    let mut created = g.created.lock().expect("lock");
    let Some((props, _)) = created.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, &format!("File not found: {id}."));
    };
    if !props.is_object() {
        *props = json!({});
    }
    let props = props.as_object_mut().expect("an object");
    for (key, value) in body["appProperties"].as_object().into_iter().flatten() {
        if value.is_null() {
            props.remove(key);
        } else {
            props.insert(key.clone(), value.clone());
        }
    }
    Json(json!({"id": id, "appProperties": props})).into_response()
}

async fn files_create(
    State(g): State<Google>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    if body["mimeType"] != "application/vnd.google-apps.spreadsheet" {
        return error(StatusCode::BAD_REQUEST, "only spreadsheets in this fake");
    }
    if let Some(failed) = g.injected("files.create") {
        return failed;
    }
    let id = format!("created-{}", uuid::Uuid::new_v4().simple());
    g.created
        .lock()
        .expect("lock")
        .insert(id.clone(), (body["appProperties"].clone(), Vec::new()));
    g.created_order.lock().expect("lock").push(id.clone());
    g.sheets
        .lock()
        .expect("lock")
        .insert(id.clone(), vec!["Sheet1".into()]);
    Json(json!({"id": id, "name": body["name"]})).into_response()
}

async fn permissions(
    State(g): State<Google>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(denied) = unauthorized(&g, &headers) {
        return denied;
    }
    let Some(email) = body["emailAddress"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "emailAddress is required");
    };
    if let Some(failed) = g.injected("permissions.create") {
        return failed;
    }
    match g.created.lock().expect("lock").get_mut(&id) {
        Some((_, shared)) => {
            // Sharing again with the same address changes nothing, as in Drive.
            if !shared.iter().any(|s| s == email) {
                shared.push(email.to_owned());
            }
            Json(json!({"id": "perm", "role": body["role"], "type": body["type"]})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, &format!("File not found: {id}.")),
    }
}
