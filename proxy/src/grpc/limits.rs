//! The edge decides: a submission is checked against [`Limits`] before
//! anything else sees it, so that nothing reaches the database, a plugin or
//! the run log that would refuse it, and the caller learns which field broke
//! which limit.

use proto::{
    prost_types::{Struct, Value, value::Kind},
    v1::SubmissionContext,
};

/// The most owners a submission's context may name.
pub const MAX_OWNER_EMAILS: usize = 100;

/// What a submission may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of objects and lists (the submission itself is 1).
    pub max_depth: usize,
    /// Most keys, counted over every object in the submission.
    pub max_keys: usize,
    /// Longest string or key, in bytes.
    pub max_string_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_keys: 10_000,
            max_string_bytes: 64 * 1024,
        }
    }
}

/// Why a submission was refused: the field's path and what it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// Where a field is ("submission.answers.tags[2]"): put together only
/// when a refusal names it, so that a submission that passes costs no
/// allocation per key.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Key(parent, key) => {
                // At most 64 characters of a key, and a NUL shown escaped.
                write!(f, "{parent}.")?;
                for c in key.chars().take(64) {
                    match c {
                        '\0' => f.write_str("\\u0000")?,
                        c => std::fmt::Write::write_char(f, c)?,
                    }
                }
                Ok(())
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

impl Limits {
    /// Checks `submission` (a request's `submission` field) against the limits.
    ///
    /// NUL characters (U+0000) are refused, in keys and strings: PostgreSQL's
    /// `jsonb` cannot store them, and a submission Daisy could not record
    /// must be refused before it is accepted. Numbers must be finite, since
    /// JSON has no NaN or infinity.
    pub fn check(&self, submission: &Struct) -> Result<(), Refusal> {
        let mut keys = 0;
        self.check_struct(submission, &Path::Root("submission"), 1, &mut keys)
    }

    /// Checks a request's `context`: each string within the string limit and
    /// free of NUL characters, and at most [`MAX_OWNER_EMAILS`] owners.
    pub fn check_context(&self, context: &SubmissionContext) -> Result<(), Refusal> {
        if context.owner_emails.len() > MAX_OWNER_EMAILS {
            return Err(Refusal(format!(
                "context.owner_emails: more than {MAX_OWNER_EMAILS} addresses"
            )));
        }
        self.check_string(
            &context.organisation_id,
            &Path::Root("context.organisation_id"),
            "string",
        )?;
        self.check_string(
            &context.submitter,
            &Path::Root("context.submitter"),
            "string",
        )?;
        self.check_string(&context.locale, &Path::Root("context.locale"), "string")?;
        let owners = Path::Root("context.owner_emails");
        for (i, email) in context.owner_emails.iter().enumerate() {
            self.check_string(email, &Path::Index(&owners, i), "string")?;
        }
        Ok(())
    }

    fn check_struct(
        &self,
        s: &Struct,
        path: &Path<'_>,
        depth: usize,
        keys: &mut usize,
    ) -> Result<(), Refusal> {
        if depth > self.max_depth {
            return Err(Refusal(format!(
                "{path}: nested deeper than {} levels",
                self.max_depth
            )));
        }
        *keys += s.fields.len();
        if *keys > self.max_keys {
            return Err(Refusal(format!(
                "{path}: the submission has more than {} keys",
                self.max_keys
            )));
        }
        for (key, value) in &s.fields {
            let at = Path::Key(path, key);
            self.check_string(key, &at, "key")?;
            self.check_value(value, &at, depth, keys)?;
        }
        Ok(())
    }

    fn check_value(
        &self,
        value: &Value,
        path: &Path<'_>,
        depth: usize,
        keys: &mut usize,
    ) -> Result<(), Refusal> {
        match &value.kind {
            None | Some(Kind::NullValue(_)) | Some(Kind::BoolValue(_)) => Ok(()),
            Some(Kind::NumberValue(n)) if n.is_finite() => Ok(()),
            Some(Kind::NumberValue(n)) => Err(Refusal(format!(
                "{path}: {n} is not a finite number (JSON has no NaN or infinity)"
            ))),
            Some(Kind::StringValue(s)) => self.check_string(s, path, "string"),
            Some(Kind::StructValue(s)) => self.check_struct(s, path, depth + 1, keys),
            Some(Kind::ListValue(list)) => {
                if depth + 1 > self.max_depth {
                    return Err(Refusal(format!(
                        "{path}: nested deeper than {} levels",
                        self.max_depth
                    )));
                }
                for (i, item) in list.values.iter().enumerate() {
                    self.check_value(item, &Path::Index(path, i), depth + 1, keys)?;
                }
                Ok(())
            }
        }
    }

    fn check_string(&self, s: &str, path: &Path<'_>, what: &str) -> Result<(), Refusal> {
        if s.len() > self.max_string_bytes {
            return Err(Refusal(format!(
                "{path}: a {what} of {} bytes is longer than the limit of {} bytes",
                s.len(),
                self.max_string_bytes
            )));
        }
        if let Some(at) = s.find('\0') {
            return Err(Refusal(format!(
                "{path}: the {what} holds a NUL character (U+0000) at byte {at}, which Daisy cannot store; remove it or encode it"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proto::json::json_to_struct;
    use serde_json::json;

    use super::*;

    fn check(doc: serde_json::Value) -> Result<(), Refusal> {
        Limits::default().check(&json_to_struct(doc).expect("an object"))
    }

    fn nested(levels: usize) -> serde_json::Value {
        (1..levels).fold(json!({"leaf": 1}), |inner, _| json!({ "n": inner }))
    }

    #[test]
    fn ordinary_submissions_pass() {
        assert_eq!(
            check(json!({"answers": {"q1": [1, "two", null, true]}})),
            Ok(())
        );
        assert_eq!(check(nested(32)), Ok(()));
    }

    #[test]
    fn each_limit_names_the_field_and_the_limit() {
        let refused = |doc| check(doc).expect_err("refused").0;
        let deep = refused(nested(33));
        assert!(
            deep.contains("submission.n.n") && deep.contains("32 levels"),
            "{deep}"
        );
        let nul = refused(json!({"answers": {"name": "x\u{0}y"}}));
        assert!(
            nul.starts_with("submission.answers.name:") && nul.contains("NUL"),
            "{nul}"
        );
        let key = refused(json!({"a\u{0}b": 1}));
        assert!(key.contains("key") && key.contains("NUL"), "{key}");
        let long = refused(json!({"essay": "x".repeat(64 * 1024 + 1)}));
        assert!(
            long.contains("submission.essay") && long.contains("65536 bytes"),
            "{long}"
        );
        let listed = refused(json!({"list": [1, ["\u{0}"]]}));
        assert!(listed.starts_with("submission.list[1][0]:"), "{listed}");
        let many: serde_json::Map<_, _> =
            (0..10_001).map(|i| (format!("k{i}"), json!(i))).collect();
        let keys = refused(serde_json::Value::Object(many));
        assert!(keys.contains("10000 keys"), "{keys}");
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        let mut s = json_to_struct(json!({"x": 1})).expect("object");
        s.fields.insert(
            "x".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let refused = Limits::default().check(&s).expect_err("refused").0;
        assert!(
            refused.contains("submission.x") && refused.contains("finite"),
            "{refused}"
        );
    }
}
