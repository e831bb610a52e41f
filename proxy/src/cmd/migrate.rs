//! `daisy migrate`: create or update the database schema.

use anyhow::Context;
use proxy::registry::Registry;

use crate::cli::DbArgs;

/// `daisy migrate`.
pub(crate) fn run(db: &DbArgs) -> anyhow::Result<()> {
    let applied = Registry::new(&db.config())
        .migrate()
        .context("migrating the task registry")?;
    if applied.is_empty() {
        println!("database is up to date");
    }
    for version in applied {
        println!("applied migration {version}");
    }
    Ok(())
}
