//! The connection pool's manager: diesel's, minus a round trip per checkout.
//!
//! r2d2 checks a connection's health as it hands it out, and diesel's
//! check is a `SELECT 1`: one more round trip to PostgreSQL for every
//! statement the outbox, the run log or a worker writes. A connection
//! whose last statement succeeded moments ago is almost surely healthy, so
//! it goes out unchecked; one that failed, or that idled past [`FRESH`], is
//! checked as before (and replaced if the check fails). When an unchecked
//! one was lost meanwhile (the server restarted, the network cut it), its
//! statement fails as one in flight would, and the caller sees the
//! database as unreachable (`RegistryError::is_unreachable`: `UNAVAILABLE`,
//! and transient to the writers, which try again).

use std::time::{Duration, Instant};

use diesel::{
    PgConnection,
    connection::{Connection, Instrumentation, InstrumentationEvent},
    r2d2::{ConnectionManager, Error, ManageConnection},
};

/// How long after a successful statement a connection goes out unchecked.
/// Under load, connections come back within milliseconds; an idle pool is
/// checked as always. A database restart inside this window fails the
/// next statement of each such connection (as it fails those in flight),
/// and that failure sends the connection to be checked and replaced.
const FRESH: Duration = Duration::from_millis(100);

/// Diesel's [`ConnectionManager`] that skips the checkout's check for a
/// connection that just worked ([`Health`]).
#[derive(Debug)]
pub(crate) struct Manager(ConnectionManager<PgConnection>);

impl Manager {
    pub(super) fn new(url: &str) -> Manager {
        Manager(ConnectionManager::new(url))
    }
}

impl ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = Error;

    fn connect(&self) -> Result<PgConnection, Error> {
        let mut conn = self.0.connect()?;
        conn.set_instrumentation(Health::default());
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), Error> {
        if needs_check(conn) {
            self.0.is_valid(conn)
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        self.0.has_broken(conn)
    }
}

/// Whether `conn` must be checked before it goes out: unless its last
/// statement succeeded less than [`FRESH`] ago.
fn needs_check(conn: &mut PgConnection) -> bool {
    conn.instrumentation()
        .downcast_mut::<Health>()
        .and_then(|health| health.last_ok)
        .is_none_or(|at| at.elapsed() >= FRESH)
}

/// When the connection's last statement succeeded; none once one failed.
#[derive(Debug, Default)]
struct Health {
    last_ok: Option<Instant>,
}

impl Instrumentation for Health {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { error, .. } = event {
            self.last_ok = error.is_none().then(Instant::now);
        }
    }
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;

    use super::*;

    #[test]
    fn a_connection_is_checked_until_a_statement_succeeds_and_after_a_failure_or_a_pause() {
        let db = test_support::db::TestDb::empty();
        let manager = Manager::new(&db.url);
        let mut conn = manager.connect().expect("connecting");
        assert!(
            needs_check(&mut conn),
            "a new connection has run nothing yet"
        );
        conn.batch_execute("SELECT 1").expect("a statement");
        assert!(!needs_check(&mut conn), "it just worked");
        conn.batch_execute("SELECT 1/0")
            .expect_err("division by zero");
        assert!(needs_check(&mut conn), "its last statement failed");
        manager.is_valid(&mut conn).expect("the check passes");
        assert!(
            !needs_check(&mut conn),
            "the check is a statement that worked"
        );
        std::thread::sleep(FRESH + Duration::from_millis(20));
        assert!(needs_check(&mut conn), "it idled past FRESH");
    }
}
