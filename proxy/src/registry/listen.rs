//! The LISTEN loop: a thread that reports changes to forms' tasks and to
//! the API keys (see `migrations/` for the triggers that NOTIFY).

use std::{
    thread,
    time::{Duration, Instant},
};

use diesel::{Connection, PgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Registry;
use crate::error::RegistryError;

/// The NOTIFY channel the `tasks` trigger announces changes on.
const CHANNEL: &str = "daisy_tasks";
/// The NOTIFY channel the `api_keys` trigger announces changes on.
const KEYS_CHANNEL: &str = "daisy_keys";

impl Registry {
    /// Listens for changes to `tasks` until `stop` is cancelled, blocking
    /// the calling thread (the catalog gives it one of its own), which polls
    /// `stop` every [`POLL`].
    ///
    /// Calls `on_event` with [`Change::Reset`] each time it has (re)connected,
    /// because changes made while it was away were missed, and with
    /// [`Change::Form`] for each change after that. While disconnected it
    /// retries every `retry` (a fixed pace: one connection attempt per
    /// process is no load worth backing off from).
    pub fn listen(&self, retry: Duration, stop: &CancellationToken, on_event: impl Fn(Change)) {
        let mut was_connected = true;
        while !stop.is_cancelled() {
            match listen_once(&self.url, stop, &on_event) {
                Ok(()) => return,
                Err(err) => {
                    if was_connected {
                        tracing::warn!(error = %err, "task change listener lost the database; retrying");
                    }
                    was_connected = false;
                    on_event(Change::Lost);
                }
            }
            sleep_unless_stopped(retry, stop);
        }
    }
}

/// A change reported by [`Registry::listen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The listener (re)connected: anything cached may be stale.
    Reset,
    /// The listener lost its connection: changes are not seen until `Reset`.
    Lost,
    /// The tasks of this form changed.
    Form(Uuid),
    /// The API keys changed (one was created or revoked).
    Keys,
}

/// How often the listener polls its connection for notifications. Polling is
/// a non-blocking read, so this bounds how late a change is seen.
const POLL: Duration = Duration::from_millis(50);
/// How often it proves the connection alive with a query.
const HEARTBEAT: Duration = Duration::from_secs(5);

fn listen_once(
    url: &str,
    stop: &CancellationToken,
    on_event: &impl Fn(Change),
) -> Result<(), RegistryError> {
    let mut conn = PgConnection::establish(url).map_err(RegistryError::Connect)?;
    diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(&mut conn)?;
    diesel::sql_query(format!("LISTEN {KEYS_CHANNEL}")).execute(&mut conn)?;
    tracing::debug!("listening for task changes");
    on_event(Change::Reset);
    let mut last_heartbeat = Instant::now();
    while !stop.is_cancelled() {
        for notification in conn.notifications_iter() {
            let notification = notification?;
            if notification.channel == KEYS_CHANNEL {
                on_event(Change::Keys);
                continue;
            }
            match notification.payload.parse::<Uuid>() {
                Ok(form) => on_event(Change::Form(form)),
                Err(_) => on_event(Change::Reset),
            }
        }
        if last_heartbeat.elapsed() >= HEARTBEAT {
            diesel::sql_query("SELECT 1").execute(&mut conn)?;
            last_heartbeat = Instant::now();
        }
        thread::sleep(POLL);
    }
    Ok(())
}

fn sleep_unless_stopped(total: Duration, stop: &CancellationToken) {
    let deadline = Instant::now() + total;
    while !stop.is_cancelled() && Instant::now() < deadline {
        thread::sleep(POLL);
    }
}
