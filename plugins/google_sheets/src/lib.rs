//! `google_sheets`: each response becomes a row of a Google Sheet, each
//! question a column (asynchronous; the seed's sample app).
//!
//! Authenticates as a Google service account: a JWT signed with the
//! account's RS256 key is exchanged at the OAuth token endpoint, and the
//! access token is cached until shortly before it expires. Writes the header
//! row once (and widens it when new questions appear), then appends rows with
//! `spreadsheets.values.append`. Without a spreadsheet id, creates one
//! spreadsheet per form on first use, found again later through its Drive
//! `appProperties`, and shares it with the configured addresses.
//!
//! Creating a form's spreadsheet takes several calls, any of which can
//! fail, so it is done in an order that a later run can always finish: the
//! file is created tagged `daisy_form_pending`; then the tab is added if
//! missing, the header written, the shares made; only then is it tagged
//! `daisy_form` (and the pending tag removed). A run looks for a tagged
//! file first (the oldest, so workers that raced converge on one), then
//! for a pending one, which it finishes with the same idempotent steps,
//! and creates one only when there is neither. No run writes to a
//! spreadsheet that lacks its tab, and the per-form cache holds only
//! finished spreadsheets.
//!
//! Errors: 429 and 5xx are retryable and carry the server's `Retry-After`,
//! so the worker's backoff absorbs quota bursts; other 4xx are permanent,
//! with the API's message. A write whose reply never came (a timeout, a
//! broken connection) may have been made: its error says so, and says what
//! a later attempt does about it. See README.md for the config.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use plugin_api::{Input, Secret, Task, TaskError, Value, json};
use schemars::JsonSchema;
use serde::Deserialize;

/// The Drive `appProperties` key naming a finished spreadsheet's form.
const TAG: &str = "daisy_form";
/// The key naming the form of a spreadsheet still being set up.
const PENDING: &str = "daisy_form_pending";

const SCOPES: &str =
    "https://www.googleapis.com/auth/spreadsheets https://www.googleapis.com/auth/drive.file";

/// The service account's key file (the fields Daisy uses).
#[derive(serde::Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The Sheets export task.
pub struct GoogleSheets {
    agent: ureq::Agent,
    email: String,
    key: jsonwebtoken::EncodingKey,
    token_url: String,
    sheets_url: String,
    drive_url: String,
    spreadsheet: Option<String>,
    sheet: String,
    share_with: Vec<String>,
    token: Mutex<Option<(String, Instant)>>,
    /// Spreadsheet id → its header row, once read.
    headers: Mutex<HashMap<String, Vec<String>>>,
    /// Form id → its spreadsheet, when created per form; finished ones only.
    per_form: Mutex<HashMap<String, String>>,
}

/// An HTTP answer: status, `Retry-After`, JSON body.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Value,
}

/// The task's config.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct Config {
    /// The service account key (the JSON Google Cloud exports):
    /// `{"secret": "NAME"}`, a file of Daisy's `--secrets-dir`.
    pub credentials: Secret,
    /// No longer read (a file path): refused with a hint.
    #[serde(default)]
    #[schemars(skip)]
    pub credentials_file: Option<Value>,
    /// The spreadsheet to append to; without it, one spreadsheet per form
    /// is created (and shared with the form's owners and `share_with`).
    #[serde(default)]
    pub spreadsheet_id: Option<String>,
    /// The sheet (tab) the rows go to.
    #[serde(default = "default_sheet")]
    pub sheet: String,
    /// Who a created spreadsheet is shared with, besides the form's owners.
    #[serde(default)]
    pub share_with: Vec<String>,
    /// How long one request may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The OAuth token endpoint; the key file's `token_uri` if not given.
    #[serde(default)]
    pub token_url: Option<String>,
    /// The Sheets API's base URL.
    #[serde(default = "default_sheets_url")]
    pub sheets_base_url: String,
    /// The Drive API's base URL.
    #[serde(default = "default_drive_url")]
    pub drive_base_url: String,
}

fn default_sheet() -> String {
    "Responses".into()
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_sheets_url() -> String {
    "https://sheets.googleapis.com".into()
}

fn default_drive_url() -> String {
    "https://www.googleapis.com".into()
}

impl GoogleSheets {
    /// Builds the task: reads the key file; see README.md for the config.
    pub fn new(config: Config) -> Result<Self, TaskError> {
        if config.credentials_file.is_some() {
            return Err(TaskError::permanent(
                "credentials_file is no longer read: put the service account key in a file of Daisy's --secrets-dir and set \"credentials\": {\"secret\": \"NAME\"}",
            ));
        }
        // The key's contents are never quoted in errors: only what is wrong.
        let account: ServiceAccount = plugin_api::serde_json::from_str(config.credentials.expose())
            .map_err(|e| {
                TaskError::permanent(format!(
                    "the credentials secret is not a service account key (line {}, column {})",
                    e.line(),
                    e.column()
                ))
            })?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(
            |_| TaskError::permanent("the credentials secret's private_key is not an RSA PEM key"),
        )?;
        let url = |url: &str| url.trim_end_matches('/').to_owned();
        Ok(GoogleSheets {
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
                .http_status_as_error(false)
                .build()
                .into(),
            email: account.client_email,
            key,
            token_url: url(config.token_url.as_deref().unwrap_or(&account.token_uri)),
            sheets_url: url(&config.sheets_base_url),
            drive_url: url(&config.drive_base_url),
            spreadsheet: config.spreadsheet_id,
            sheet: config.sheet,
            share_with: config.share_with,
            token: Mutex::new(None),
            headers: Mutex::new(HashMap::new()),
            per_form: Mutex::new(HashMap::new()),
        })
    }

    /// A valid access token, from the cache or a fresh exchange.
    fn token(&self) -> Result<String, TaskError> {
        let mut cached = self
            .token
            .lock()
            .map_err(|_| TaskError::retryable("token cache poisoned"))?;
        if let Some((token, expires)) = cached.as_ref() {
            if Instant::now() + Duration::from_secs(60) < *expires {
                return Ok(token.clone());
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: &self.email,
            scope: SCOPES,
            aud: &self.token_url,
            iat: now,
            exp: now + 3600,
        };
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.key,
        )
        .map_err(|e| TaskError::permanent(format!("signing the token request: {e}")))?;
        let answer = check(
            "token exchange",
            None,
            self.agent.post(&self.token_url).send_form([
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", jwt.as_str()),
            ]),
        )?;
        let token = answer.body["access_token"]
            .as_str()
            .ok_or_else(|| TaskError::retryable("token endpoint answered without an access_token"))?
            .to_owned();
        let lifetime = Duration::from_secs(answer.body["expires_in"].as_u64().unwrap_or(3600));
        *cached = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    fn bearer(&self) -> Result<String, TaskError> {
        Ok(format!("Bearer {}", self.token()?))
    }

    /// Sends an authorised request (`send` gets the `Authorization` value).
    /// A 401 means the cached token was revoked or expired early: it is
    /// dropped, a new one is exchanged, and the call is made once more; a
    /// 401 with a fresh token is permanent, with Google's message. A write
    /// passes `lost`: what may have happened if its reply never comes.
    fn authed(
        &self,
        what: &str,
        lost: Option<&str>,
        send: impl Fn(&str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, TaskError> {
        let bearer = self.bearer()?;
        match send(&bearer) {
            Ok(response) if response.status().as_u16() == 401 => {
                self.forget_token(&bearer);
                check(what, lost, send(&self.bearer()?))
            }
            sent => check(what, lost, sent),
        }
    }

    /// Drops the cached token if it is still the one in `bearer`.
    fn forget_token(&self, bearer: &str) {
        if let Ok(mut cached) = self.token.lock() {
            if cached
                .as_ref()
                .is_some_and(|(token, _)| bearer.strip_prefix("Bearer ") == Some(token.as_str()))
            {
                *cached = None;
            }
        }
    }

    /// The form's spreadsheet: configured, found in Drive, or created; see
    /// the crate doc for the order of the steps. A new one gets the header
    /// `keys` and is shared with the form's `owners` (from the submission
    /// context) and the configured `share_with`.
    fn spreadsheet(
        &self,
        form: &str,
        owners: &[String],
        keys: &[String],
    ) -> Result<String, TaskError> {
        if let Some(id) = &self.spreadsheet {
            return Ok(id.clone());
        }
        // Held throughout: this worker's runs of one form wait for the
        // first to find or finish the spreadsheet instead of making more.
        let mut per_form = self
            .per_form
            .lock()
            .map_err(|_| TaskError::retryable("cache poisoned"))?;
        if let Some(id) = per_form.get(form) {
            return Ok(id.clone());
        }
        let id = match self.find(TAG, form)? {
            Some(id) => {
                // Finished by whoever tagged it; the tab is checked all
                // the same (once per worker), since a release before
                // daisy_form_pending tagged spreadsheets at creation.
                self.ensure_sheet(&id)?;
                id
            }
            None => {
                let id = match self.find(PENDING, form)? {
                    Some(id) => id,
                    None => self.create_spreadsheet(form)?,
                };
                self.finish_spreadsheet(&id, form, owners, keys)?;
                id
            }
        };
        per_form.insert(form.to_owned(), id.clone());
        Ok(id)
    }

    /// The oldest spreadsheet whose `appProperties` have `key` = `form`.
    fn find(&self, key: &str, form: &str) -> Result<Option<String>, TaskError> {
        let query =
            format!("appProperties has {{ key='{key}' and value='{form}' }} and trashed = false");
        let found = self.authed("finding the form's spreadsheet", None, |bearer| {
            self.agent
                .get(format!("{}/drive/v3/files", self.drive_url))
                .query("q", &query)
                .query("orderBy", "createdTime")
                .query("fields", "files(id)")
                .header("Authorization", bearer)
                .call()
        })?;
        Ok(found.body["files"][0]["id"].as_str().map(str::to_owned))
    }

    /// A new spreadsheet for `form`, tagged as pending.
    fn create_spreadsheet(&self, form: &str) -> Result<String, TaskError> {
        let created = self.authed(
            "creating the form's spreadsheet",
            Some("the spreadsheet may have been created (a later attempt finishes it rather than creating another)"),
            |bearer| {
                self.agent
                    .post(format!("{}/drive/v3/files", self.drive_url))
                    .header("Authorization", bearer)
                    .send_json(json!({
                        "name": format!("Daisy responses {form}"),
                        "mimeType": "application/vnd.google-apps.spreadsheet",
                        "appProperties": {PENDING: form},
                    }))
            },
        )?;
        created.body["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| TaskError::retryable("Drive created a file without an id"))
    }

    /// Makes `id` ready for rows, then tags it as `form`'s. Every step may
    /// have been done already by a run that failed later: each is safe to
    /// repeat.
    fn finish_spreadsheet(
        &self,
        id: &str,
        form: &str,
        owners: &[String],
        keys: &[String],
    ) -> Result<(), TaskError> {
        self.ensure_sheet(id)?;
        self.header(id, keys)?;
        let mut share_with: Vec<&String> = Vec::new();
        for email in owners.iter().chain(&self.share_with) {
            if !share_with.contains(&email) {
                share_with.push(email);
            }
        }
        // Sharing again with an address that has access changes nothing.
        for email in share_with {
            self.authed(
                &format!("sharing the spreadsheet with {email}"),
                Some("it may have been shared (sharing again changes nothing)"),
                |bearer| {
                    self.agent
                        .post(format!(
                            "{}/drive/v3/files/{id}/permissions",
                            self.drive_url
                        ))
                        .query("sendNotificationEmail", "false")
                        .header("Authorization", bearer)
                        .send_json(json!({"type": "user", "role": "writer", "emailAddress": email}))
                },
            )?;
        }
        // Last: from now on runs take it as finished. Drive removes a key
        // set to null.
        self.authed(
            "tagging the form's spreadsheet",
            Some("the tag may have been set (a later attempt finds the spreadsheet by it)"),
            |bearer| {
                self.agent
                    .patch(format!("{}/drive/v3/files/{id}", self.drive_url))
                    .header("Authorization", bearer)
                    .send_json(json!({"appProperties": {TAG: form, PENDING: null}}))
            },
        )?;
        Ok(())
    }

    /// Adds the sheet (tab) to `spreadsheet` unless it has it already.
    fn ensure_sheet(&self, spreadsheet: &str) -> Result<(), TaskError> {
        let got = self.authed("reading the spreadsheet's sheets", None, |bearer| {
            self.agent
                .get(format!("{}/v4/spreadsheets/{spreadsheet}", self.sheets_url))
                .query("fields", "sheets.properties.title")
                .header("Authorization", bearer)
                .call()
        })?;
        let present = got.body["sheets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|sheet| sheet["properties"]["title"].as_str() == Some(&self.sheet));
        if present {
            return Ok(());
        }
        let added = self.authed(
            "adding the sheet",
            Some("the sheet may have been added (a later attempt looks for it before adding it)"),
            |bearer| {
                self.agent
                    .post(format!(
                        "{}/v4/spreadsheets/{spreadsheet}:batchUpdate",
                        self.sheets_url
                    ))
                    .header("Authorization", bearer)
                    .send_json(
                        json!({"requests": [{"addSheet": {"properties": {"title": self.sheet}}}]}),
                    )
            },
        );
        match added {
            // Another worker finishing the same spreadsheet added it first.
            Err(e) if !e.is_retryable() && e.message().contains("already exists") => Ok(()),
            other => other.map(drop),
        }
    }

    fn values_url(&self, spreadsheet: &str, range: &str) -> String {
        format!(
            "{}/v4/spreadsheets/{spreadsheet}/values/{}",
            self.sheets_url,
            encode(&format!("'{}'!{range}", self.sheet.replace('\'', "''")))
        )
    }

    /// Whether a row for `submission` is in the sheet already.
    fn has_row(&self, spreadsheet: &str, submission: &str) -> Result<bool, TaskError> {
        let column = self.authed("looking for the submission's row", None, |bearer| {
            self.agent
                .get(self.values_url(spreadsheet, "A:A"))
                .header("Authorization", bearer)
                .call()
        })?;
        Ok(column.body["values"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|row| row[0].as_str() == Some(submission)))
    }

    /// The header row, widened with `keys` it lacks (written back if so).
    fn header(&self, spreadsheet: &str, keys: &[String]) -> Result<Vec<String>, TaskError> {
        let mut headers = self
            .headers
            .lock()
            .map_err(|_| TaskError::retryable("cache poisoned"))?;
        if !headers.contains_key(spreadsheet) {
            let read = self.authed("reading the header row", None, |bearer| {
                self.agent
                    .get(self.values_url(spreadsheet, "1:1"))
                    .header("Authorization", bearer)
                    .call()
            })?;
            let existing = read.body["values"][0]
                .as_array()
                .map(|row| {
                    row.iter()
                        .map(|c| c.as_str().unwrap_or_default().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            headers.insert(spreadsheet.to_owned(), existing);
        }
        let header = headers.get_mut(spreadsheet).expect("inserted above");
        let mut wanted: Vec<String> = ["submission_id", "form_id"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        wanted.extend(keys.iter().cloned());
        let missing: Vec<String> = wanted.into_iter().filter(|k| !header.contains(k)).collect();
        if !missing.is_empty() {
            let mut widened = header.clone();
            widened.extend(missing);
            self.authed(
                "writing the header row",
                Some("the header may have been written (a later attempt reads it before writing)"),
                |bearer| {
                    self.agent
                        .put(self.values_url(spreadsheet, "1:1"))
                        .query("valueInputOption", "RAW")
                        .header("Authorization", bearer)
                        .send_json(json!({ "values": [&widened] }))
                },
            )?;
            *header = widened;
        }
        Ok(header.clone())
    }
}

/// Whether a request that failed with `error` may still have reached
/// Google: anything but a failure to connect at all.
fn may_have_arrived(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => false,
        ureq::Error::Timeout(timeout) => {
            !matches!(timeout, ureq::Timeout::Resolve | ureq::Timeout::Connect)
        }
        ureq::Error::Io(io) => io.kind() != std::io::ErrorKind::ConnectionRefused,
        _ => true,
    }
}

/// The error for a request that got no answer. A write (`lost` says what
/// may have happened) that may have reached Google says so, since a run
/// that ends dead with this error leaves that for someone to check.
fn unanswered(what: &str, lost: Option<&str>, error: &ureq::Error) -> TaskError {
    match lost {
        Some(lost) if may_have_arrived(error) => {
            let why = if matches!(error, ureq::Error::Timeout(_)) {
                "did not answer in time"
            } else {
                "broke off before answering"
            };
            TaskError::retryable(format!("{what}: Google {why}; {lost}: {error}"))
        }
        _ => TaskError::retryable(format!("{what}: Google unreachable: {error}")),
    }
}

/// Turns a response into an [`Answer`], or a [`TaskError`] for errors.
fn check(
    what: &str,
    lost: Option<&str>,
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Answer, TaskError> {
    let mut response = sent.map_err(|e| unanswered(what, lost, &e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(plugin_api::parse_retry_after);
    let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
    let answer = Answer {
        status,
        retry_after,
        body,
    };
    let message = || {
        answer.body["error"]["message"]
            .as_str()
            .or_else(|| answer.body["error_description"].as_str())
            .or_else(|| answer.body["error"].as_str())
            .unwrap_or("no message")
            .to_owned()
    };
    match answer.status {
        200..=299 => Ok(answer),
        429 | 500..=599 => {
            let err = TaskError::retryable(format!(
                "{what}: Google answered {}: {}",
                answer.status,
                message()
            ));
            Err(match answer.retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            })
        }
        status => Err(TaskError::permanent(format!(
            "{what}: Google refused ({status}): {}",
            message()
        ))),
    }
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn cell(value: Option<&Value>) -> Value {
    match value {
        None | Some(Value::Null) => Value::String(String::new()),
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v.clone(),
        Some(other) => Value::String(other.to_string()),
    }
}

impl Task for GoogleSheets {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        let answers = input.answers();
        let mut keys: Vec<String> = answers.keys().cloned().collect();
        keys.sort();
        let spreadsheet = self.spreadsheet(&input.form_id, &input.context.owner_emails, &keys)?;
        // A later attempt may follow an append whose reply was lost: the
        // row is looked for (by its submission_id, column A) before
        // appending again.
        if input.attempt > 1 && self.has_row(&spreadsheet, &input.submission_id)? {
            return Ok(json!({
                "spreadsheet_id": spreadsheet,
                "updated_range": null,
                "already_appended": true,
            }));
        }
        let header = self.header(&spreadsheet, &keys)?;
        let row: Vec<Value> = header
            .iter()
            .map(|column| match column.as_str() {
                "submission_id" => Value::String(input.submission_id.clone()),
                "form_id" => Value::String(input.form_id.clone()),
                key => cell(answers.get(key)),
            })
            .collect();
        let appended = self.authed(
            "appending the row",
            Some("the row may have been written (a later attempt looks for it before appending again)"),
            |bearer| {
                self.agent
                    .post(format!("{}:append", self.values_url(&spreadsheet, "A1")))
                    .query("valueInputOption", "RAW")
                    .query("insertDataOption", "INSERT_ROWS")
                    .header("Authorization", bearer)
                    .send_json(json!({ "values": [&row] }))
            },
        )?;
        Ok(json!({
            "spreadsheet_id": spreadsheet,
            "updated_range": appended.body["updates"]["updatedRange"],
        }))
    }
}

plugin_api::export_plugin!("append_row" => GoogleSheets::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_ranges_are_encoded_for_the_path() {
        assert_eq!(encode("'My Sheet'!A1"), "%27My%20Sheet%27%21A1");
    }
}
