//! API keys: who may call Daisy, and for which forms.
//!
//! A key's token (`dsy_` and 43 URL-safe base64 characters: 256 random
//! bits) is shown once, when `daisy key create` makes it; the database keeps
//! only its SHA-256, which is all a serve needs to recognise it. Every serve
//! holds the active keys in memory and reloads them when the `api_keys`
//! trigger notifies, so a revocation takes effect within the listener's poll
//! (50 ms). A plain hash is enough: tokens are random, not passwords.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use base64::Engine;
use sha2::{Digest, Sha256};
use tonic::{Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::{error::RegistryError, registry::Registry};

/// What every token starts with, so that a leaked one is easy to recognise.
pub const TOKEN_PREFIX: &str = "dsy_";

/// How often a key's `last_used_at` is written, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// How `daisy serve` authenticates calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call is allowed (the default on a loopback address only).
    None,
    /// Every call needs `authorization: Bearer <token>` of an active key.
    Token,
}

/// A new random token.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The SHA-256 of `token`, as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// An active key, as a serve knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Its id.
    pub id: Uuid,
    /// Its name (for logs and errors; never the token).
    pub name: String,
    /// The forms it may use; `None`: every form.
    pub forms: Option<Vec<Uuid>>,
    /// Whether it is an admin key.
    pub admin: bool,
}

impl Key {
    /// Whether the key may call Daisy for `form`.
    pub fn may_use(&self, form: Uuid) -> bool {
        self.admin
            || self
                .forms
                .as_ref()
                .is_none_or(|forms| forms.contains(&form))
    }

    /// `PERMISSION_DENIED`, naming the key and the form (never the token).
    pub fn denied(&self, form: Uuid) -> Status {
        Status::permission_denied(format!("API key '{}' may not use form {form}", self.name))
    }
}

/// The active keys, kept fresh by the registry's listener.
pub struct Keys {
    registry: Registry,
    by_hash: RwLock<HashMap<[u8; 32], Arc<Key>>>,
    touched: Mutex<HashMap<Uuid, Instant>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// The active keys of `registry`, loaded now.
    pub fn load(registry: Registry) -> Result<Keys, RegistryError> {
        let keys = Keys {
            registry,
            by_hash: RwLock::default(),
            touched: Mutex::default(),
        };
        keys.reload()?;
        Ok(keys)
    }

    /// Reads the active keys again (blocking).
    pub fn reload(&self) -> Result<(), RegistryError> {
        let loaded: HashMap<[u8; 32], Arc<Key>> = self
            .registry
            .active_keys()?
            .into_iter()
            .filter_map(|stored| {
                let hash: [u8; 32] = stored.token_sha256.try_into().ok()?;
                let key = Key {
                    id: stored.id,
                    name: stored.name,
                    forms: stored
                        .forms
                        .map(|forms| forms.into_iter().flatten().collect()),
                    admin: stored.admin,
                };
                Some((hash, Arc::new(key)))
            })
            .collect();
        tracing::debug!(keys = loaded.len(), "API keys loaded");
        *self.by_hash.write().expect("keys lock poisoned") = loaded;
        Ok(())
    }

    /// The key whose token the call's `authorization: Bearer` carries, or
    /// `UNAUTHENTICATED` saying what is wrong (never echoing the token).
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Key>, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <API key>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <API key>`")
            })?;
        let key = self
            .by_hash
            .read()
            .expect("keys lock poisoned")
            .get(&token_hash(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown or revoked API key"))?;
        self.touch(&key);
        Ok(key)
    }

    /// Whether `token` is a live admin key (for the console's writes).
    pub fn is_admin(&self, token: &str) -> bool {
        self.by_hash
            .read()
            .expect("keys lock poisoned")
            .get(&token_hash(token.trim()))
            .is_some_and(|key| key.admin)
    }

    /// Records the key's use, at most once a minute, off the caller's path.
    fn touch(&self, key: &Key) {
        {
            let mut touched = self.touched.lock().expect("touched lock poisoned");
            let now = Instant::now();
            match touched.get(&key.id) {
                Some(last) if now.duration_since(*last) < TOUCH_EVERY => return,
                _ => {
                    // Bounded by the number of keys.
                    touched.insert(key.id, now);
                }
            }
        }
        let (registry, id) = (self.registry.clone(), key.id);
        std::thread::spawn(move || {
            if let Err(err) = registry.touch_key(id) {
                tracing::debug!(error = %err, "recording an API key's use failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_prefixed() {
        let (a, b) = (new_token().expect("token"), new_token().expect("token"));
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn a_key_may_use_its_forms_and_an_admin_key_every_form() {
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        let key = Key {
            id: Uuid::new_v4(),
            name: "backend".into(),
            forms: Some(vec![mine]),
            admin: false,
        };
        assert!(key.may_use(mine));
        assert!(!key.may_use(other));
        assert!(key.denied(other).message().contains("'backend'"));
        let all = Key {
            forms: None,
            ..key.clone()
        };
        assert!(all.may_use(other));
        let admin = Key { admin: true, ..key };
        assert!(admin.may_use(other));
    }
}
