//! Forms and their questions: `POST /forms`, `GET /forms/{id}`.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The kinds of question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A string.
    Text,
    /// A number.
    Number,
    /// true or false.
    Boolean,
    /// One of `options`.
    Choice,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Number => "number",
            Kind::Boolean => "boolean",
            Kind::Choice => "choice",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "number" => Kind::Number,
            "boolean" => Kind::Boolean,
            "choice" => Kind::Choice,
            _ => Kind::Text,
        }
    }
}

/// A question, as created and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    /// Its id (assigned).
    #[serde(default)]
    pub id: Option<Uuid>,
    /// How answers name it.
    pub key: String,
    /// What the respondent sees.
    pub label: String,
    /// Its type.
    pub kind: Kind,
    /// Whether an answer is required.
    #[serde(default)]
    pub required: bool,
    /// The choices, for `choice`.
    #[serde(default)]
    pub options: Vec<String>,
    /// Free-form metadata.
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

pub(crate) fn empty_object() -> Value {
    json!({})
}

/// A form, as created and returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Form {
    /// Its id (assigned).
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Its title.
    pub title: String,
    /// Free-form metadata.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Who owns the form: Daisy's tasks see it in the submission context
    /// (google_sheets shares the form's spreadsheet with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_email: Option<String>,
    /// Its questions, in order.
    pub questions: Vec<Question>,
}

pub(crate) async fn create_form(
    State(pool): State<DbPool>,
    body: Result<Json<Form>, JsonRejection>,
) -> Result<(StatusCode, Json<Form>), ApiError> {
    let Json(mut form) = body?;
    if form.title.trim().is_empty() {
        return Err(unprocessable("title must not be empty".into()));
    }
    if let Some(owner) = &form.owner_email {
        let (local, domain) = owner.split_once('@').unwrap_or_default();
        if local.is_empty() || !domain.contains('.') || owner.chars().any(char::is_whitespace) {
            return Err(unprocessable(format!(
                "owner_email '{owner}' is not an email address"
            )));
        }
    }
    let mut keys = std::collections::HashSet::new();
    for q in &form.questions {
        if q.key.is_empty()
            || !q
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(unprocessable(format!(
                "question key '{}' must be letters, digits or '_'",
                q.key
            )));
        }
        if !keys.insert(q.key.clone()) {
            return Err(unprocessable(format!(
                "question key '{}' is used twice",
                q.key
            )));
        }
        if q.kind == Kind::Choice && q.options.is_empty() {
            return Err(unprocessable(format!(
                "choice question '{}' needs options",
                q.key
            )));
        }
    }
    let form_id = Uuid::new_v4();
    form.id = Some(form_id);
    for q in &mut form.questions {
        q.id = Some(Uuid::new_v4());
    }
    let saved = form.clone();
    blocking(&pool, move |conn| {
        conn.transaction(|conn| {
            diesel::insert_into(forms::table)
                .values((
                    forms::id.eq(form_id),
                    forms::title.eq(&saved.title),
                    forms::metadata.eq(&saved.metadata),
                    forms::owner_email.eq(&saved.owner_email),
                ))
                .execute(conn)?;
            let rows: Vec<_> = saved
                .questions
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    (
                        questions::id.eq(q.id.unwrap_or_default()),
                        questions::form_id.eq(form_id),
                        questions::key.eq(&q.key),
                        questions::label.eq(&q.label),
                        questions::kind.eq(q.kind.as_str()),
                        questions::required.eq(q.required),
                        questions::options.eq(json!(q.options)),
                        questions::position.eq(i as i32),
                        questions::metadata.eq(&q.metadata),
                    )
                })
                .collect();
            diesel::insert_into(questions::table)
                .values(&rows)
                .execute(conn)?;
            Ok::<_, diesel::result::Error>(())
        })
        .map_err(internal)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(form)))
}

type QuestionRow = (Uuid, String, String, String, bool, Value, Value);

pub(crate) fn load_form(conn: &mut PgConnection, id: Uuid) -> Result<Option<Form>, ApiError> {
    let found: Option<(String, Value, Option<String>)> = forms::table
        .find(id)
        .select((forms::title, forms::metadata, forms::owner_email))
        .first(conn)
        .optional()
        .map_err(internal)?;
    let Some((title, metadata, owner_email)) = found else {
        return Ok(None);
    };
    let rows: Vec<QuestionRow> = questions::table
        .filter(questions::form_id.eq(id))
        .order(questions::position)
        .select((
            questions::id,
            questions::key,
            questions::label,
            questions::kind,
            questions::required,
            questions::options,
            questions::metadata,
        ))
        .load(conn)
        .map_err(internal)?;
    Ok(Some(Form {
        id: Some(id),
        title,
        metadata,
        owner_email,
        questions: rows
            .into_iter()
            .map(
                |(qid, key, label, kind, required, options, metadata)| Question {
                    id: Some(qid),
                    key,
                    label,
                    kind: Kind::parse(&kind),
                    required,
                    options: serde_json::from_value(options).unwrap_or_default(),
                    metadata,
                },
            )
            .collect(),
    }))
}

pub(crate) async fn get_form(
    State(pool): State<DbPool>,
    Path(id): Path<Uuid>,
) -> Result<Json<Form>, ApiError> {
    blocking(&pool, move |conn| load_form(conn, id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no form {id}")))
}
