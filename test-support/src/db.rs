//! PostgreSQL: databases of their own ([`TestDb`], dropped with the value),
//! Daisy's migrations applied by the real binary, plain SQL on them, and
//! where the server is.

use std::{net::SocketAddr, path::Path, time::Duration};

use diesel::{Connection, PgConnection, RunQueryDsl, connection::SimpleConnection};
use uuid::Uuid;

use crate::artifacts::daisy_bin;

/// The server that test databases are created on.
pub fn admin_url() -> String {
    std::env::var("DAISY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

/// The PostgreSQL server's address, from the admin URL.
pub fn postgres_addr() -> SocketAddr {
    let url = admin_url();
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split_once('/').expect("path").0;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().expect("PostgreSQL address is host:port")
}

/// A database of its own, kept as long as the value and dropped with it.
pub struct TestDb {
    name: String,
    /// The server's URL, to drop the database.
    admin: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates an empty database on [`admin_url`]'s server.
    pub fn empty() -> TestDb {
        TestDb::create(&admin_url(), "daisy_test")
    }

    /// Creates an empty database named `<prefix>_<uuid>` on the server at
    /// `admin` (a URL whose user may create databases).
    pub fn create(admin: &str, prefix: &str) -> TestDb {
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let mut conn = PgConnection::establish(admin).expect("connecting to PostgreSQL");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .expect("creating the test database");
        TestDb {
            url: with_database(admin, &name),
            admin: admin.to_owned(),
            name,
        }
    }

    /// Creates a database and applies Daisy's migrations with `daisy migrate`.
    pub fn daisy() -> TestDb {
        let db = TestDb::empty();
        db.migrate(&daisy_bin());
        db
    }

    /// Applies Daisy's migrations with `daisy migrate`, run by binary `daisy`.
    pub fn migrate(&self, daisy: &Path) {
        let output = std::process::Command::new(daisy)
            .arg("migrate")
            .env("DATABASE_URL", &self.url)
            .output()
            .expect("running daisy migrate");
        assert!(
            output.status.success(),
            "daisy migrate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs plain SQL, one statement or several, as an operator would with
    /// psql.
    pub fn execute(&self, sql: &str) {
        let mut conn = PgConnection::establish(&self.url).expect("connecting to the test database");
        conn.batch_execute(sql).expect("running SQL");
    }

    /// Runs a query of one text column, as with `psql -tAc`; its first row.
    pub fn query_one(&self, sql: &str) -> String {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            value: String,
        }
        let mut conn = PgConnection::establish(&self.url).expect("connecting to the test database");
        diesel::sql_query(format!("SELECT ({sql}) AS value"))
            .get_result::<Row>(&mut conn)
            .expect("running SQL")
            .value
    }

    /// Attaches a task to `form` with plain SQL (at most 5 attempts); returns
    /// its id.
    pub fn attach(
        &self,
        form: Uuid,
        name: &str,
        module: &str,
        func: &str,
        is_async: bool,
        config: &serde_json::Value,
    ) -> Uuid {
        let id = Uuid::new_v4();
        let config = config.to_string().replace('\'', "''");
        self.execute(&format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status, config, max_attempts) \
             VALUES ('{id}', '{form}', '{name}', '{module}', '{func}', {is_async}, '{config}', 5)"
        ));
        id
    }

    /// Lets a Daisy database settle between measurements: waits until the
    /// run log has written its backlog (the row count holds still), then
    /// vacuums and analyzes, so that nothing measured next pays for earlier
    /// background writes or for an autovacuum that their rows triggered.
    pub async fn settle(&self) {
        let mut last = None;
        loop {
            let rows = self.query_one(
                "SELECT ((SELECT count(*) FROM task_runs) + (SELECT count(*) FROM sync_runs))::text",
            );
            if last.as_ref() == Some(&rows) {
                break;
            }
            last = Some(rows);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.execute("VACUUM ANALYZE");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.admin) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}
