//! Secrets by name: a task's config says `{"secret": "NAME"}`, and Daisy
//! hands the plugin the contents of `NAME` in `--secrets-dir`.
//!
//! Names are plain file names (letters, digits, `_`, `.`, `-`), so a config
//! cannot point at any other file. Each file must belong to Daisy's user or
//! root and be readable by no one else (mode 0600 or stricter). Values are
//! read again after [`CACHE_FOR`], so a rotated secret reaches new task
//! instances without a restart. Errors name the secret, never its value.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::error::PluginError;

/// How long a secret's value is kept before its file is read again.
pub const CACHE_FOR: Duration = Duration::from_secs(10);

/// The secrets directory, and the values read from it lately.
#[derive(Debug, Default)]
pub struct Secrets {
    dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, (Arc<str>, Instant)>>,
}

/// The name a JSON value refers to, if it is a secret reference.
fn reference(value: &Value) -> Option<&Value> {
    let object = value.as_object()?;
    (object.len() == 1).then(|| object.get("secret"))?
}

impl Secrets {
    /// Secrets from `dir`; without one, a config naming a secret fails.
    pub fn new(dir: Option<PathBuf>) -> Secrets {
        Secrets {
            dir,
            cache: Mutex::default(),
        }
    }

    /// `config` with every `{"secret": NAME}` replaced by the secret's value;
    /// `None` when it names no secret (the common case, which allocates
    /// nothing).
    pub fn resolve(&self, config: &Value) -> Result<Option<Value>, String> {
        if !mentions_secret(config) {
            return Ok(None);
        }
        let mut resolved = config.clone();
        self.replace(&mut resolved)?;
        Ok(Some(resolved))
    }

    fn replace(&self, value: &mut Value) -> Result<(), String> {
        if let Some(name) = reference(value) {
            let name = name
                .as_str()
                .ok_or("a secret reference must be {\"secret\": \"NAME\"}")?;
            *value = Value::String(self.value(name)?.to_string());
            return Ok(());
        }
        match value {
            Value::Array(items) => items.iter_mut().try_for_each(|v| self.replace(v)),
            Value::Object(fields) => fields.values_mut().try_for_each(|v| self.replace(v)),
            _ => Ok(()),
        }
    }

    fn value(&self, name: &str) -> Result<Arc<str>, String> {
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(format!(
                "secret name {name:?} is not a plain file name (letters, digits, '_', '.', '-')"
            ));
        }
        if let Some((value, at)) = self.cache.lock().expect("secrets lock poisoned").get(name) {
            if at.elapsed() < CACHE_FOR {
                return Ok(value.clone());
            }
        }
        let dir = self.dir.as_ref().ok_or_else(|| {
            format!("the config names secret '{name}', but Daisy was started without --secrets-dir")
        })?;
        let path = dir.join(name);
        let file = std::fs::File::open(&path)
            .map_err(|err| format!("secret '{name}' ('{}'): {err}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|err| format!("secret '{name}': {err}"))?;
        super::files::owned_by_daisy(&meta)
            .map_err(|owner| format!("refusing secret '{name}': {owner}"))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "refusing secret '{name}': its file is readable or writable by others (mode {:o}); `chmod 600` it",
                meta.mode() & 0o777
            ));
        }
        let text =
            std::io::read_to_string(file).map_err(|err| format!("secret '{name}': {err}"))?;
        let value: Arc<str> = text.trim_end_matches(['\n', '\r']).into();
        let mut cache = self.cache.lock().expect("secrets lock poisoned");
        // Bounded by the number of secret files named in configs.
        cache.insert(name.to_owned(), (value.clone(), Instant::now()));
        Ok(value)
    }

    /// The error a task whose secrets could not be resolved fails with.
    pub fn error(module: &str, reason: String) -> PluginError {
        PluginError::Load {
            module: module.to_owned(),
            reason,
        }
    }
}

fn mentions_secret(value: &Value) -> bool {
    match value {
        Value::Object(fields) => {
            fields.contains_key("secret") || fields.values().any(mentions_secret)
        }
        Value::Array(items) => items.iter().any(mentions_secret),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    #[test]
    fn references_are_replaced_by_values_and_bad_ones_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, value: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, value).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("twilio_token", "s3cr3t\n", 0o600);
        write("loose", "LOOSEVALUE", 0o644);
        let secrets = Secrets::new(Some(dir.path().to_owned()));
        let config = json!({"account": "AC1", "auth_token": {"secret": "twilio_token"}, "list": [{"secret": "twilio_token"}]});
        let resolved = secrets.resolve(&config).expect("resolved").expect("some");
        assert_eq!(resolved["auth_token"], "s3cr3t");
        assert_eq!(resolved["list"][0], "s3cr3t");
        assert_eq!(resolved["account"], "AC1");
        assert_eq!(secrets.resolve(&json!({"a": 1})), Ok(None));

        let err = secrets
            .resolve(&json!({"t": {"secret": "loose"}}))
            .expect_err("refused");
        assert!(
            err.contains("chmod 600") && !err.contains("LOOSEVALUE"),
            "{err}"
        );
        let err = secrets
            .resolve(&json!({"t": {"secret": "../etc/passwd"}}))
            .expect_err("refused");
        assert!(err.contains("not a plain file name"), "{err}");
        let err = secrets
            .resolve(&json!({"t": {"secret": "missing"}}))
            .expect_err("refused");
        assert!(err.contains("secret 'missing'"), "{err}");
        let none = Secrets::new(None);
        let err = none.resolve(&config).expect_err("refused");
        assert!(err.contains("--secrets-dir"), "{err}");
    }
}
