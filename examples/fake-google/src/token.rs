//! The OAuth token endpoint: a service account's signed JWT for a bearer token.

use std::collections::HashMap;

use axum::{
    Form, Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Google, error};
pub(crate) async fn token(
    State(g): State<Google>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
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
