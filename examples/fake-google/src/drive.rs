//! The Drive API: creating, finding (by `appProperties`), tagging and sharing spreadsheets.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Google, error, unauthorized};
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
pub(crate) async fn files_list(
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
pub(crate) async fn files_update(
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

pub(crate) async fn files_create(
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

pub(crate) async fn permissions(
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
