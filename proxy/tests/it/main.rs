//! Integration tests of the proxy against the real PostgreSQL and real built
//! plugin libraries. See `util` for what they need.

mod util;

mod asynchronous;
mod authoring;
mod browser;
mod cli;
mod console;
mod database;
mod edge;
mod faults;
mod fuzz;
mod hosts;
mod hot_reload;
mod ops;
mod plans;
mod process;
mod quotas;
mod run_log;
mod security;
mod service;
mod shutdown;
mod validation;
mod writes;
