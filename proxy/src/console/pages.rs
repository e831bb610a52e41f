//! The console's pages, rendered on the server with maud.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::{
    plugins::LibraryInfo,
    registry::{AttemptRecord, MinuteCount, Quarantine, Run, RunFilter, RunStats, TaskDef},
};

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#222}\
nav{background:#2d3a4a;padding:.6em 1em}nav a{color:#fff;margin-right:1.2em;text-decoration:none}\
main{padding:1em 1.5em}table{border-collapse:collapse;width:100%}\
td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}\
.dead,.failed{color:#b00}.succeeded{color:#070}pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}\
form.inline{display:inline}.figure{display:inline-block;margin-right:2em}.figure b{font-size:1.6em}";

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                // No favicon request (it would 404).
                link rel="icon" href="data:,";
                title { (title) " · Daisy" }
                style { (STYLE) }
            }
            body {
                nav {
                    a href="/" { "Overview" }
                    a href="/runs" { "Runs" }
                    a href="/dead" { "Dead runs" }
                    a href="/forms" { "Forms" }
                    a href="/plugins" { "Plugins" }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// The hidden fields every write carries, and the admin key field when
/// API keys are on.
fn write_fields(csrf: &str, keys_on: bool) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(csrf);
        @if keys_on {
            input type="password" name="admin_key" placeholder="admin API key" required;
        }
    }
}

/// An error page.
pub fn error(status: StatusCode, message: &str) -> Markup {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        html! { p { (message) } },
    )
}

/// Runs per minute over the last hour (a stacked bar chart in SVG), and the
/// outbox and run figures.
pub fn overview(minutes: &[MinuteCount], stats: &RunStats) -> Markup {
    let now = Utc::now();
    let mut bars = vec![[0i64; 3]; 60];
    for m in minutes {
        let ago = (now - m.minute).num_minutes();
        if (0..60).contains(&ago) {
            let slot = &mut bars[59 - ago as usize];
            let i = match m.standing.as_str() {
                "succeeded" => 0,
                "failed" => 1,
                _ => 2,
            };
            slot[i] += m.runs;
        }
    }
    let top = bars
        .iter()
        .map(|b| b.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let failed: i64 = bars.iter().map(|b| b[1]).sum();
    let total: i64 = bars.iter().map(|b| b.iter().sum::<i64>()).sum();
    let state = |name: &str| {
        stats
            .by_state
            .iter()
            .find(|(s, _)| s == name)
            .map_or(0, |(_, n)| *n)
    };
    let lag = stats
        .oldest_unpublished
        .and_then(|at| (now - at).to_std().ok())
        .map_or(0, |d| d.as_secs());
    layout(
        "Overview",
        html! {
            div {
                span.figure { b { (total) } " runs in the last hour" }
                span.figure.failed { b { (failed) } " failed" }
                span.figure { b { (stats.unpublished) } " unpublished (oldest " (lag) " s)" }
                span.figure { b { (state("queued") + state("retrying")) } " waiting" }
                span.figure { b { (state("running")) } " running" }
                span.figure.dead { b { (state("dead")) } " dead" }
            }
            h2 { "Runs per minute, last hour" }
            svg width="720" height="160" viewBox="0 0 720 160" role="img" aria-label="runs per minute" {
                @for (i, bar) in bars.iter().enumerate() {
                    @let mut y = 150.0;
                    @for (n, colour) in bar.iter().zip(["#2a8a3a", "#c03030", "#999999"]) {
                        @let h = 140.0 * (*n as f64) / top;
                        @if *n > 0 {
                            rect x=(i * 12) y=(format!("{:.1}", { y -= h; y })) width="10" height=(format!("{h:.1}")) fill=(colour) {
                                title { (n) }
                            }
                        }
                    }
                }
                line x1="0" y1="150" x2="720" y2="150" stroke="#444" {}
                text x="0" y="160" font-size="10" { "60 min ago" }
                text x="680" y="160" font-size="10" { "now" }
            }
            p { "Green: succeeded; red: failed or dead; grey: not finished." }
        },
    )
}

/// A page of runs with its filter form and the link to the next page;
/// `retry` (the CSRF token) when the page offers retrying dead runs.
pub fn runs(
    filter: &RunFilter,
    carried: &[(&str, String)],
    rows: &[Run],
    next: Option<&str>,
    retry: Option<&str>,
    keys_on: bool,
) -> Markup {
    let path = if retry.is_some() { "/dead" } else { "/runs" };
    let next_href = next.map(|after| {
        let mut query: Vec<String> = carried
            .iter()
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .collect();
        query.push(format!("after={after}"));
        format!("{path}?{}", query.join("&"))
    });
    layout(
        if retry.is_some() { "Dead runs" } else { "Runs" },
        html! {
            form method="get" action=(path) {
                input name="form" placeholder="form id" value=(filter.form.map(|f| f.to_string()).unwrap_or_default());
                " " input name="task" placeholder="task name" value=(filter.task.clone().unwrap_or_default());
                @if retry.is_none() {
                    " " select name="state" {
                        option value="" { "any state" }
                        @for s in ["queued", "running", "retrying", "succeeded", "dead"] {
                            option value=(s) selected[filter.state.is_some_and(|f| f.as_str() == s)] { (s) }
                        }
                    }
                }
                " " select name="minutes" {
                    option value="" { "any time" }
                    @for (m, label) in [(60, "last hour"), (1440, "last day"), (10080, "last week")] {
                        option value=(m) { (label) }
                    }
                }
                " " button type="submit" { "Filter" }
            }
            @if let Some(csrf) = retry {
                form method="post" action="/dead/retry" {
                    input type="hidden" name="form" value=(filter.form.map(|f| f.to_string()).unwrap_or_default());
                    input type="hidden" name="task" value=(filter.task.clone().unwrap_or_default());
                    (write_fields(csrf, keys_on))
                    " " button type="submit" { "Retry all dead runs that match" }
                }
            }
            table {
                tr { th { "created" } th { "run" } th { "form" } th { "task" } th { "state" } th { "attempts" } th { "last error" } }
                @for r in rows {
                    tr {
                        td { (time(Some(r.created_at))) }
                        td { a href=(format!("/runs/{}", r.id)) { (r.id.to_string()[..8]) } }
                        td { (r.form_id.to_string()[..8]) }
                        td { (r.task_name) @if !r.is_async { " (sync)" } }
                        td class=(r.state.as_str()) { (r.state.as_str()) }
                        td { (r.attempts) "/" (r.max_attempts) }
                        td { (r.last_error.as_deref().unwrap_or("")) }
                    }
                }
            }
            @if rows.is_empty() { p { "No runs match." } }
            @if let Some(href) = next_href { p { a href=(href) rel="next" { "Older runs →" } } }
        },
    )
}

/// One run: its fields, every attempt, its output, and a retry if dead.
pub fn run(run: &Run, attempts: &[AttemptRecord], csrf: &str, keys_on: bool) -> Markup {
    layout(
        &format!("Run {}", run.id),
        html! {
            table {
                tr { th { "task" } td { (run.task_name) " (" (run.task_id) ")" } }
                tr { th { "form" } td { a href=(format!("/runs?form={}", run.form_id)) { (run.form_id) } } }
                tr { th { "submission" } td { (run.submission_id) } }
                tr { th { "state" } td class=(run.state.as_str()) { (run.state.as_str()) } }
                tr { th { "attempts" } td { (run.attempts) " of " (run.max_attempts) } }
                tr { th { "created" } td { (time(Some(run.created_at))) } }
                tr { th { "finished" } td { (time(run.finished_at)) } }
                tr { th { "last error" } td { (run.last_error.as_deref().unwrap_or("-")) } }
            }
            @if run.state == crate::registry::RunState::Dead && run.is_async {
                form method="post" action=(format!("/runs/{}/retry", run.id)) {
                    (write_fields(csrf, keys_on))
                    " " button type="submit" { "Retry this run" }
                }
            }
            h2 { "Attempts" }
            table {
                tr { th { "#" } th { "worker" } th { "started" } th { "duration" } th { "outcome" } th { "error" } }
                @for a in attempts {
                    tr {
                        td { (a.attempt) }
                        td { (a.worker) }
                        td { (time(Some(a.started_at))) }
                        td { ((a.finished_at - a.started_at).num_milliseconds()) " ms" }
                        td class=(a.outcome) { (a.outcome) }
                        td { (a.error.as_deref().unwrap_or("")) }
                    }
                }
            }
            @if attempts.is_empty() { p { "No attempt logged (synchronous runs are not)." } }
            h2 { "Output" }
            pre { (run.output.as_ref().map_or_else(|| "-".into(), |o| serde_json::to_string_pretty(o).unwrap_or_default())) }
        },
    )
}

/// Forms and their tasks, with enable/disable and the config.
pub fn forms(tasks: &[TaskDef], csrf: &str, keys_on: bool) -> Markup {
    layout(
        "Forms",
        html! {
            @if tasks.is_empty() { p { "No task is attached to any form." } }
            @for (i, t) in tasks.iter().enumerate() {
                @if i == 0 || tasks[i - 1].form_id != t.form_id {
                    h2 { "Form " a href=(format!("/runs?form={}", t.form_id)) { (t.form_id) } }
                }
                table {
                    tr {
                        td { b { (t.name) } " " (t.module) "::" (t.func) (if t.is_async { " (async)" } else { " (sync)" }) }
                        td { @if t.enabled { "enabled" } @else { span.dead { "disabled" } } }
                        td {
                            form.inline method="post" action=(format!("/tasks/{}/enabled", t.id)) {
                                input type="hidden" name="enabled" value=(!t.enabled);
                                (write_fields(csrf, keys_on))
                                " " button type="submit" { @if t.enabled { "Disable" } @else { "Enable" } }
                            }
                        }
                    }
                    tr { td colspan="3" { pre { (t.config) } } }
                }
            }
        },
    )
}

/// Each plugin library: its tasks, version, load status and quarantines.
pub fn plugins(libraries: &[(String, Result<LibraryInfo, String>, Vec<Quarantine>)]) -> Markup {
    layout(
        "Plugins",
        html! {
            @if libraries.is_empty() { p { "No plugin library in the plugins directory." } }
            table {
                tr { th { "module" } th { "status" } th { "crate" } th { "plugin-api" } th { "tasks" } th { "quarantined" } }
                @for (module, info, quarantines) in libraries {
                    tr {
                        td { (module) }
                        @match info {
                            Ok(info) => {
                                td.succeeded { "loaded" }
                                td { (info.name) " " (info.version) }
                                td { (info.api_version) }
                                td { (info.tasks.join(", ")) }
                                td {
                                    @for q in quarantines.iter().filter(|q| q.sha256 == info.sha256) {
                                        span.dead { (q.func) " after " (q.crashes) " crashes, until " (time(Some(q.until))) } br;
                                    }
                                }
                            }
                            Err(err) => { td.failed { "error" } td colspan="4" { (err) } }
                        }
                    }
                }
            }
        },
    )
}

/// Percent-encodes a query value.
fn percent(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}
