//! `sms`: texts a receipt to the customer whose phone number is among the
//! answers, through an HTTP SMS gateway with a Twilio-compatible Messages
//! API (asynchronous). See README.md for the config.

use std::time::Duration;

use base64::Engine;
use plugin_api::{Input, Secret, Task, TaskError, Value, json};
use schemars::JsonSchema;
use serde::Deserialize;

/// The SMS receipt task.
pub struct Sms {
    agent: ureq::Agent,
    messages_url: String,
    authorization: String,
    from: String,
    phone_field: String,
    template: String,
}

/// The task's config.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct Config {
    /// The gateway account (Twilio's Account SID).
    pub account_sid: String,
    /// The sender: a number or an alphanumeric sender id.
    pub from: String,
    /// The text; `{answer}` placeholders are filled from the answers.
    pub template: String,
    /// The answer holding the customer's phone number.
    #[serde(default = "default_phone_field")]
    pub phone_field: String,
    /// The gateway's base URL.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// How long one request to the gateway may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The gateway's auth token: `{"secret": "NAME"}`, a file of Daisy's
    /// `--secrets-dir`.
    pub auth_token: Secret,
    /// No longer read (an environment variable name): refused with a hint.
    #[serde(default)]
    #[schemars(skip)]
    pub auth_token_env: Option<Value>,
    /// No longer read (a file path): refused with a hint.
    #[serde(default)]
    #[schemars(skip)]
    pub auth_token_file: Option<Value>,
}

fn default_phone_field() -> String {
    "phone".into()
}

fn default_base_url() -> String {
    "https://api.twilio.com".into()
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl Sms {
    /// Builds the task: see README.md for the config.
    pub fn new(config: Config) -> Result<Self, TaskError> {
        if config.auth_token_env.is_some() || config.auth_token_file.is_some() {
            return Err(TaskError::permanent(
                "auth_token_env and auth_token_file are no longer read: put the token in a file of Daisy's --secrets-dir and set \"auth_token\": {\"secret\": \"NAME\"}",
            ));
        }
        let token = config.auth_token.expose();
        let base_url = config.base_url.trim_end_matches('/');
        let account = &config.account_sid;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .build()
            .into();
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{account}:{token}"));
        Ok(Sms {
            agent,
            messages_url: format!("{base_url}/2010-04-01/Accounts/{account}/Messages.json"),
            authorization: format!("Basic {credentials}"),
            from: config.from,
            phone_field: config.phone_field,
            template: config.template,
        })
    }
}

/// A phone number as errors, logs and outputs show it: its first two and
/// last three digits, the rest masked (`+447700900999` → `+44*******999`).
pub fn mask(number: &str) -> String {
    mask_digits(number, 2)
}

/// `text` with its digits masked, but for the first `keep_first` and the
/// last three.
fn mask_digits(text: &str, keep_first: usize) -> String {
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    let mut seen = 0;
    text.chars()
        .map(|c| {
            if !c.is_ascii_digit() {
                return c;
            }
            seen += 1;
            if seen <= keep_first || seen > digits.saturating_sub(3) {
                c
            } else {
                '*'
            }
        })
        .collect()
}

/// `text` with every run of six or more digits (a phone number, most
/// likely) masked, for messages from the gateway, which quote numbers.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.bytes().filter(u8::is_ascii_digit).count() >= 6 {
            out.push_str(&mask(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Every digit of `raw` but the last three masked: for input that is not
/// a valid number, where no digit can be trusted to be harmless.
fn scrub_all(raw: &str) -> String {
    mask_digits(raw, 0)
}

/// The number in E.164 (`+` and 8 to 15 digits), separators removed.
pub fn e164(raw: &str) -> Option<String> {
    let number: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = number.strip_prefix('+')?;
    let ok = (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    ok.then_some(number)
}

/// Fills `{key}` placeholders with answers; a missing answer is an error.
pub fn fill(
    template: &str,
    answers: &plugin_api::serde_json::Map<String, Value>,
) -> Result<String, TaskError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            return Err(TaskError::permanent("template has an unclosed '{'"));
        };
        let key = &rest[start + 1..start + len];
        match answers.get(key) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {
                return Err(TaskError::permanent(format!(
                    "template needs answer '{key}', which is missing"
                )));
            }
            Some(other) => out.push_str(&other.to_string()),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The reply of a gateway that answered with an error status: 429 and 5xx
/// are retryable (with the gateway's `Retry-After`), other 4xx permanent.
fn refused(status: u16, retry_after: Option<Duration>, reply: &Value) -> TaskError {
    // Gateways quote the number in their messages: masked here, since
    // errors land in logs and in the run's last_error.
    let detail = scrub(reply["message"].as_str().unwrap_or("no message"));
    match status {
        429 | 500..=599 => {
            let err = TaskError::retryable(format!("SMS gateway answered {status}: {detail}"));
            match retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            }
        }
        _ => TaskError::permanent(format!(
            "SMS gateway refused the message ({status}, code {}): {detail}",
            reply["code"]
        )),
    }
}

/// Whether a request that failed with `error` may still have reached the
/// gateway: anything but a failure to connect at all.
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

/// Today's date in UTC, `YYYY-MM-DD` (Twilio's `DateSent` filter).
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date(secs / 86_400)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_date(days: u64) -> String {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

impl Sms {
    /// The message sent today to `to` from our sender with `body`, if the
    /// gateway lists one: an earlier attempt's, whose reply was lost.
    /// Messages the gateway reports `failed` or `canceled` never left it
    /// and do not count.
    fn sent_today(&self, to: &str, body: &str) -> Result<Option<Value>, TaskError> {
        let what = "looking up earlier messages";
        let mut response = self
            .agent
            .get(&self.messages_url)
            .query("To", to)
            .query("From", &self.from)
            .query("DateSent>", today_utc())
            .query("PageSize", "50")
            .header("Authorization", &self.authorization)
            .call()
            // The URL holds the number: scrubbed in case the error quotes it.
            .map_err(|e| {
                TaskError::retryable(scrub(&format!("{what}: SMS gateway unreachable: {e}")))
            })?;
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        let reply: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        if !(200..=299).contains(&status) {
            // Retryable whatever the status: the send is still to be made,
            // and a later attempt can look again.
            let detail = scrub(reply["message"].as_str().unwrap_or("no message"));
            let err =
                TaskError::retryable(format!("{what}: SMS gateway answered {status}: {detail}"));
            return Err(match retry_after {
                Some(after) => err.with_retry_after(after),
                None => err,
            });
        }
        let Some(messages) = reply["messages"].as_array() else {
            return Err(TaskError::retryable(format!(
                "{what}: SMS gateway answered without a list of messages"
            )));
        };
        Ok(messages
            .iter()
            .find(|m| {
                m["to"].as_str() == Some(to)
                    && m["body"].as_str() == Some(body)
                    && !matches!(m["status"].as_str(), Some("failed" | "canceled"))
            })
            .cloned())
    }
}

fn retry_after(response: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(plugin_api::parse_retry_after)
}

impl Task for Sms {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        let answers = input.answers();
        let raw = answers
            .get(&self.phone_field)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                TaskError::permanent(format!("no phone number in answer '{}'", self.phone_field))
            })?;
        let to = e164(raw).ok_or_else(|| {
            TaskError::permanent(format!(
                "invalid phone number '{}' in answer '{}': expected E.164, like +14155550100",
                scrub_all(raw),
                self.phone_field
            ))
        })?;
        let body = fill(&self.template, answers)?;
        // A later attempt may follow a send whose reply was lost (a
        // timeout, a broken connection): the message is looked up before
        // sending again. See README.md for what this can and cannot catch.
        if input.attempt > 1 {
            if let Some(sent) = self.sent_today(&to, &body)? {
                return Ok(json!({
                    "sid": sent["sid"],
                    "status": sent["status"],
                    "to": mask(&to),
                    "already_sent": true,
                }));
            }
        }
        let mut response = self
            .agent
            .post(&self.messages_url)
            .header("Authorization", &self.authorization)
            .send_form([
                ("To", to.as_str()),
                ("From", self.from.as_str()),
                ("Body", body.as_str()),
            ])
            .map_err(|e| {
                let detail = scrub(&e.to_string());
                TaskError::retryable(if may_have_arrived(&e) {
                    let why = if matches!(e, ureq::Error::Timeout(_)) {
                        "did not answer in time"
                    } else {
                        "broke off before answering"
                    };
                    format!(
                        "SMS gateway {why}; the message may have been delivered (a later attempt looks it up before sending again): {detail}"
                    )
                } else {
                    format!("SMS gateway unreachable: {detail}")
                })
            })?;
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        let reply: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(json!({
                "sid": reply["sid"],
                "status": reply["status"],
                "to": mask(&to),
            })),
            _ => Err(refused(status, retry_after, &reply)),
        }
    }
}

plugin_api::export_plugin!("sms" => Sms::new);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_normalised_to_e164_or_refused() {
        assert_eq!(e164("+44 7700 900-123").as_deref(), Some("+447700900123"));
        assert_eq!(e164("(+1) 415.555.0100").as_deref(), Some("+14155550100"));
        for bad in [
            "07700900123",
            "+0123456789",
            "+12",
            "+1234567890123456",
            "+44abc",
            "",
        ] {
            assert_eq!(e164(bad), None, "{bad}");
        }
    }

    #[test]
    fn phone_numbers_are_masked_wherever_they_are_shown() {
        assert_eq!(mask("+447700900999"), "+44*******999");
        assert_eq!(
            scrub("The 'To' number +15555550100 is not a valid phone number."),
            "The 'To' number +15******100 is not a valid phone number."
        );
        assert_eq!(scrub("code 21211, 400"), "code 21211, 400");
        assert_eq!(scrub_all("0770 0900"), "**** *900");
    }

    #[test]
    fn days_since_the_epoch_are_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(20_453), "2025-12-31");
    }

    #[test]
    fn templates_are_filled_from_answers() {
        let answers = json!({"name": "Ada", "rating": 5})
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            fill("Thanks {name}, you gave {rating}/5.", &answers),
            Ok("Thanks Ada, you gave 5/5.".into())
        );
        assert!(fill("Hi {nobody}", &answers).is_err_and(|e| e.message().contains("'nobody'")));
    }
}
