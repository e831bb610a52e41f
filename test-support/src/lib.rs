//! Test support shared by the workspace's test suites and `daisy-bench`:
//! real PostgreSQL databases, real RabbitMQ exchanges and queues, built
//! plugin libraries, real `daisy` processes, and a TCP relay that cuts
//! connections on demand.
//!
//! Every test owns what it creates and drops it afterwards, so tests run in
//! parallel and leave nothing behind. Needs PostgreSQL
//! (`DAISY_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a user that may create
//! databases), RabbitMQ (`DAISY_TEST_AMQP_URL`, default the local broker),
//! and the workspace built (`make test` does it; by hand:
//! `cargo build --workspace`), since tests load the plugin libraries and run
//! the `daisy` binary from `target/debug` (`daisy-bench`: `target/release`).
//!
//! - [`db`]: databases of their own ([`TestDb`]) and the server's address.
//! - [`broker`]: exchanges and queues of their own ([`TestQueue`]).
//! - [`net`]: free ports, URLs pointed elsewhere, the [`Relay`], a gRPC
//!   channel that waits for its server.
//! - [`artifacts`]: the built binary and plugin libraries of a [`Profile`],
//!   plugins directories.
//! - [`daisy`]: `daisy serve` and `daisy worker` processes ([`Launcher`],
//!   [`Daisy`], [`Process`]) and waiting for runs.
//! - [`stack`]: a whole Daisy for plugin tests ([`Stack`]).
//! - [`pki`], [`secrets`]: certificates for TLS, a secrets directory.
//!
//! Everything is re-exported here, so users write `test_support::TestDb`.

pub mod artifacts;
pub mod broker;
pub mod daisy;
pub mod db;
pub mod net;
pub mod pki;
pub mod secrets;
pub mod stack;

pub use artifacts::{PluginsDir, Profile, built_plugin, daisy_bin, library_file_name};
pub use broker::{TestQueue, amqp_addr, amqp_url};
pub use daisy::{Daisy, Launcher, Process, WORKER_ARGS, wait_for_runs};
pub use db::{TestDb, admin_url, postgres_addr};
pub use net::{Relay, connect, free_port, with_port};
pub use pki::{Pki, TlsRelay};
pub use secrets::SecretsDir;
pub use stack::Stack;
