//! The Sheets API: values (header row, appends), the spreadsheet's sheets and `addSheet`.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Google, error, throttled, unauthorized};
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

pub(crate) async fn values_get(
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

pub(crate) async fn values_put(
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

pub(crate) async fn values_append(
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
pub(crate) async fn spreadsheet_get(
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
pub(crate) async fn batch_update(
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
