//! `api_keys`: the stored side of API keys (see `crate::auth`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Registry, schema::api_keys};
use crate::error::RegistryError;

/// A key as the database holds it (never the token, only its hash).
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg))]
pub struct StoredKey {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// The SHA-256 of its token.
    pub token_sha256: Vec<u8>,
    /// The forms it may use; `None`: every form.
    pub forms: Option<Vec<Option<Uuid>>>,
    /// Whether it may administer Daisy (every form, `runs retry`, the console).
    pub admin: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When a serve last accepted it (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    /// Its unique name.
    pub name: &'a str,
    /// The SHA-256 of its token.
    pub token_sha256: &'a [u8],
    /// The forms it may use; `None`: every form.
    pub forms: Option<&'a [Uuid]>,
    /// Whether it is an admin key.
    pub admin: bool,
}

impl Registry {
    /// Stores a new key; fails if the name is taken.
    pub fn create_key(&self, key: &NewKey<'_>) -> Result<Uuid, RegistryError> {
        let mut conn = self.conn()?;
        let id = Uuid::new_v4();
        let forms: Option<Vec<Option<Uuid>>> = key
            .forms
            .map(|forms| forms.iter().copied().map(Some).collect());
        diesel::insert_into(api_keys::table)
            .values((
                api_keys::id.eq(id),
                api_keys::name.eq(key.name),
                api_keys::token_sha256.eq(key.token_sha256),
                api_keys::forms.eq(forms),
                api_keys::admin.eq(key.admin),
            ))
            .execute(&mut conn)?;
        Ok(id)
    }

    /// Every key, revoked ones included, by name.
    pub fn keys(&self) -> Result<Vec<StoredKey>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(api_keys::table
            .order(api_keys::name)
            .select(StoredKey::as_select())
            .load(&mut conn)?)
    }

    /// The keys not revoked.
    pub fn active_keys(&self) -> Result<Vec<StoredKey>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(api_keys::table
            .filter(api_keys::revoked_at.is_null())
            .select(StoredKey::as_select())
            .load(&mut conn)?)
    }

    /// Revokes the key `name`; false if there is no such key not yet revoked.
    pub fn revoke_key(&self, name: &str) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        let revoked = diesel::update(
            api_keys::table
                .filter(api_keys::name.eq(name))
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(api_keys::revoked_at.eq(diesel::dsl::now))
        .execute(&mut conn)?;
        Ok(revoked > 0)
    }

    /// Records that key `id` was used now.
    pub fn touch_key(&self, id: Uuid) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        diesel::update(api_keys::table.find(id))
            .set(api_keys::last_used_at.eq(diesel::dsl::now))
            .execute(&mut conn)?;
        Ok(())
    }
}
