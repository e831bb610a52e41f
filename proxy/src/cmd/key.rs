//! `daisy key`: create, list and revoke API keys.

use anyhow::Context;
use proxy::registry::Registry;
use uuid::Uuid;

use crate::cli::KeyCommand;

/// `daisy key`.
pub(crate) fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            name,
            forms,
            all_forms,
            admin,
            db,
        } => {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 100,
                "--name must be 1 to 100 characters"
            );
            let token = proxy::auth::new_token().context("drawing a random token")?;
            Registry::new(&db.config())
                .create_key(&proxy::registry::NewKey {
                    name: &name,
                    token_sha256: &proxy::auth::token_hash(&token),
                    forms: (!all_forms && !admin).then_some(forms.as_slice()),
                    admin,
                })
                .with_context(|| format!("creating key '{name}' (is the name taken?)"))?;
            eprintln!("created key '{name}'; its token follows, shown this once:");
            println!("{token}");
            Ok(())
        }
        KeyCommand::List { db } => {
            let keys = Registry::new(&db.config()).keys().context("listing keys")?;
            println!(
                "{:<24}  {:<6}  {:<20}  {:<20}  {:<20}  FORMS",
                "NAME", "ADMIN", "CREATED", "LAST USED", "REVOKED"
            );
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                )
            };
            for k in keys {
                let forms = match &k.forms {
                    None => "all".to_owned(),
                    Some(forms) => forms
                        .iter()
                        .flatten()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                };
                println!(
                    "{:<24}  {:<6}  {:<20}  {:<20}  {:<20}  {forms}",
                    k.name,
                    k.admin,
                    when(Some(k.created_at)),
                    when(k.last_used_at),
                    when(k.revoked_at),
                );
            }
            Ok(())
        }
        KeyCommand::Revoke { name, db } => {
            let revoked = Registry::new(&db.config())
                .revoke_key(&name)
                .context("revoking the key")?;
            anyhow::ensure!(revoked, "no active key named '{name}'");
            println!("revoked key '{name}'");
            Ok(())
        }
    }
}
