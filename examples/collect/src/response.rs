//! Responses: submit (the route Daisy's layer wraps), read one back, and
//! the ones Daisy rejected.

#[allow(clippy::wildcard_imports)]
use super::*;

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
pub(crate) fn validate(
    form: &Form,
    answers: &serde_json::Map<String, Value>,
) -> Result<(), ApiError> {
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
pub(crate) fn daisy_view(
    form_id: Uuid,
    response_id: Uuid,
    answers: &serde_json::Map<String, Value>,
    metadata: &Value,
) -> Value {
    json!({ "form_id": form_id, "response_id": response_id, "answers": answers, "metadata": metadata })
}

/// What Daisy's tasks learn of a submission to a form owned by `owner`.
/// The submitter's locale comes from the request (see [`locale_from_request`]).
pub(crate) fn context_of(owner: Option<String>) -> SubmissionContext {
    SubmissionContext {
        owner_emails: owner.into_iter().collect(),
        ..SubmissionContext::default()
    }
}

/// Puts the submitter's locale (the first tag of `Accept-Language`) in the
/// request's [`SubmissionContext`] extension, where the Daisy layer finds it.
pub(crate) async fn locale_from_request(
    mut request: axum::extract::Request,
    next: Next,
) -> Response {
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

pub(crate) async fn submit(
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

pub(crate) fn load_response(
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

pub(crate) async fn get_response(
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
pub(crate) async fn rejected_responses(
    State(pool): State<DbPool>,
) -> Result<Json<Value>, ApiError> {
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
